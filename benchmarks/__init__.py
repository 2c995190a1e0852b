"""Fan-out benchmarks: the array-job executor against one job per electron, on the local cloud.

    python -m benchmarks.fanout --electrons 1000            # one fan-out, both modes
    python -m benchmarks.fanout --all                       # everything RESULTS.md shows

Modules: :mod:`.harness` runs one fan-out and measures it, :mod:`.storage_log` counts Cloud
Storage operations, :mod:`.suite` holds the plans (``--all``, ``--quick``, the window sweep)
and runs them in child processes, :mod:`.profiling` summarises a py-spy profile,
:mod:`.plots` and :mod:`.report` turn ``benchmarks/results/*.json`` into PNGs and RESULTS.md.
"""
