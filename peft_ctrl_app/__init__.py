"""The peft-ctrl application: the ``peft-ctrl`` command line, the main job, the benchmark runner, its tasks and
shipped data, and SEAL's forensics tools (attacks and the ``peft-ctrl seal`` commands).

It is built on the library (``peft_ctrl``), which never imports it: see docs/index.md for the map of the two.
"""
