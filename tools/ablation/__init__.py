"""The pieces of ``tools/ablate.py`` (the command line), one file per responsibility:

* ``grid.py``: the grid file (rows x seeds) -> :class:`~tools.ablation.grid.Grid`, checked;
* ``plan.py``: a grid's runs (resolved configs, hashes, run folders and their states, stamps);
* ``launch.py``: training the runs here (``--max-parallel``) or as a Slurm array (submitit);
* ``aggregate.py``: the summary.json values of the finished runs -> one table line per row;
* ``stats.py``: the statistics over seeds: mean, std, 95 % intervals, Welch's t-test p-values, Holm;
* ``report.py``: results.csv and results.md;
* ``study.py``: a study file (several grids, shared seeds, a reference per grid) and its unique runs;
* ``study_report.py``: a study's REPORT.md; ``figures.py``: its PNGs; ``gates.py``: SDTPS gate values.
"""
