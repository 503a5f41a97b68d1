"""Helpers the tests share (imported as ``tests.support.<module>``): CLI runners, float64 meta oracles, a corpus of
bad input files, DALI fixtures, and the 2-process launchers used by the distributed tests and their scripts."""
