"""Evaluation at the paper's protocol, in three commands that each do one job:

    snpo sample   images for a prompt set, several seeds, resumable, with a manifest
    snpo score    per-image scores of sample folders with the paper's scorers (resumable)
    snpo report   tables in the paper's layout, win rates against a baseline, a sample grid

- ``prompts``: prompt-set readers (Pick-a-Pic parquet, text file, HPDv2 JSON, PartiPrompts TSV).
- ``manifest``: the sample folder's files (``manifest.jsonl``, image names, atomic writes).
- ``sample``: :class:`SampleConfig` and :func:`run_sample`.
- ``score``: :class:`ScoreConfig` and :func:`run_score`.
- ``report``: :class:`ReportConfig` and :func:`run_report` (aggregation through
  ``snpo.evaluate.aggregate``, which the toy demo's report uses too).

(``snpo.evaluate.implicit_accuracy`` is something else: the implicit accuracy of a branch on preference pairs.)
"""
