"""The one table every reader returns and every backend consumes: (absolute path, int label, source id)."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError

# Grade names for the 5-class diabetic-retinopathy scale (APTOS/EyePACS/DDR/IDRiD/Messidor-2 all use 0..4).
DR_GRADES = ("0_none", "1_mild", "2_moderate", "3_severe", "4_proliferative")
# APTOS 2019 training-set grade counts (3,662 images): the class mix of every synthetic table and image set.
APTOS_COUNTS = (1805, 370, 999, 193, 295)


def class_names(num_classes: int) -> list[str]:
    """Human names used in logs, TensorBoard tags (`recall/3_severe`) and reports."""
    if num_classes == len(DR_GRADES):
        return list(DR_GRADES)
    return [f"class_{k}" for k in range(num_classes)]


@dataclass(frozen=True)
class Record:
    path: str        # absolute path of the image file
    label: int       # 0..K-1
    source_id: str   # the id in the source layout (APTOS id_code, EyePACS image name, ...), unique per data set


class DataError(UserError, ValueError):
    """Bad input a user can fix. The message names the file and every offending row (not just the first)."""
