"""Synthetic long-context evaluation: ``python -m train.eval``.

:mod:`train.eval.tasks` generates the tasks (passkey retrieval, multi-query associative recall,
needle in a haystack) with their reference solvers; :mod:`train.eval.harness` trains a tiny model
on their mixture and scores its greedy answers under attention layouts, KV selection policies and
FFN sparsity levels; :mod:`train.eval.report` formats the table and writes it to BENCHMARKS.md.
"""
