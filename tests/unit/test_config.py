import pytest
import yaml

from trainer.config import ConfigError, config_from_dict, diff_configs, load_config, parse_override, save_config


def test_defaults_are_the_paper_settings():
    cfg = config_from_dict({})
    assert cfg.model.arch == "resnet50"
    assert cfg.optim.lr == 1e-4 and cfg.meta.lr == 1e-3
    assert cfg.train.batch_size == 32 and cfg.train.epochs == 12
    assert cfg.data.split_fractions == [0.70, 0.15, 0.15]
    assert cfg.meta.hidden == [32, 16]
    assert cfg.run.out_dir == "runs"


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n  batch_size: 8\nmodel:\n  arch: resnet18\n")
    cfg = load_config(p, ["train.epochs=5", "optim.lr=0.01", "data.split_fractions=[0.6,0.2,0.2]"])
    assert cfg.train.epochs == 5          # CLI beats YAML
    assert cfg.train.batch_size == 8      # YAML beats default
    assert cfg.model.arch == "resnet18"
    assert cfg.optim.lr == 0.01
    assert cfg.data.split_fractions == [0.6, 0.2, 0.2]


@pytest.mark.parametrize("data,key", [
    ({"train": {"epochz": 3}}, "train.epochz"),
    ({"trian": {}}, "trian"),
    ({"meta": {"granularity": "pixel"}}, "meta.granularity"),
    ({"train": {"batch_size": "big"}}, "train.batch_size"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size"),
    ({"logging": {"tensorboard": "yes"}}, "logging.tensorboard"),
    ({"data": {"split_fractions": [0.5, 0.5]}}, "data.split_fractions"),
    ({"data": {"split_fractions": "abc"}}, "data.split_fractions"),
    ({"model": "resnet50"}, "model"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last"),  # 0 would delete the checkpoint just written
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert f"'{key}'" in str(e.value)


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="'optim.lrr'"):
        config_from_dict({}, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("no_equals_sign")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.nope'"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = config_from_dict({"run": {"name": "x"}}, ["meta.granularity=class"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["meta"]["granularity"] == "class"


def test_diff_configs_lists_changed_dotted_keys():
    a = {"data": {"root": "a", "image_size": 224}, "train": {"epochs": 3}}
    b = {"data": {"root": "b", "image_size": 224}, "train": {"epochs": 4}}
    assert diff_configs(a, b) == [("data.root", "a", "b"), ("train.epochs", 3, 4)]


def test_presets_load():
    for name in ("demo", "demo_meta", "aptos_baseline", "aptos_meta", "eyepacs_meta"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.run.name
    paper = load_config("configs/aptos_meta.yaml")
    assert (paper.model.arch, paper.data.image_size, paper.train.batch_size, paper.train.epochs) == \
        ("resnet50", 224, 32, 12)
    assert paper.train.loss == "meta" and paper.meta.granularity == "batch"


@pytest.mark.parametrize("spelling,value", [("1e-3", 1e-3), ("3e-4", 3e-4), (".5", 0.5), ("1E-3", 1e-3),
                                            ("2.5e+2", 250.0), ("1_000.5", 1000.5), ("0.01", 0.01), ("4", 4.0)])
def test_every_python_float_spelling_is_a_float_on_the_cli_and_in_yaml(tmp_path, spelling, value):
    # YAML 1.1 reads `1e-3` (no dot) as a string: every learning-rate sweep used to hit "expected a number"
    cfg = config_from_dict({}, [f"optim.lr={spelling}", f"meta.fd_eps={spelling}", f"loss.focal_gamma={spelling}"])
    assert (cfg.optim.lr, cfg.meta.fd_eps, cfg.loss.focal_gamma) == (value, value, value)
    p = tmp_path / "c.yaml"
    p.write_text(f"optim:\n  lr: {spelling}\nmeta:\n  lr: {spelling}\ndata:\n  split_fractions: [0.7, 0.15, 0.15]\n")
    cfg = load_config(p)
    assert cfg.optim.lr == value and cfg.meta.lr == value and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("bad", ["abc", "1e-3x", "true", "[1]", "1,5"])
def test_a_float_key_still_refuses_what_is_not_a_number(bad):
    with pytest.raises(ConfigError, match="'optim.lr'.*expected a number"):
        config_from_dict({}, [f"optim.lr={bad}"])


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity", ".nan", ".inf"])  # float()'s and YAML's spellings
def test_a_float_key_refuses_a_non_finite_value(bad):
    with pytest.raises(ConfigError, match="'optim.lr'.*expected a finite number"):
        config_from_dict({}, [f"optim.lr={bad}"])


def test_an_override_error_names_the_override_not_the_yaml(tmp_path):
    p = tmp_path / "preset.yaml"
    p.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.epochs=3", "optim.lr=fast"])
    assert "override 'optim.lr=fast'" in str(e.value) and "preset.yaml" not in str(e.value)
    p.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"preset\.yaml: config key 'optim\.lr'"):
        load_config(p, ["train.epochs=3"])


@pytest.mark.parametrize("kind", ["config", "study"])
def test_a_missing_or_broken_yaml_file_is_one_line_naming_the_file(tmp_path, kind):
    from launch.study.spec import StudyError, load_study

    load, error = (load_config, ConfigError) if kind == "config" else (load_study, StudyError)
    missing = tmp_path / "missing.yaml"
    with pytest.raises(error) as e:
        load(missing)
    assert str(e.value) == f"{kind} file not found: {missing}"
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(error) as e:
        load(broken)
    assert str(e.value).startswith(f"{broken}: not valid YAML: ")
