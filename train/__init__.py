"""Training for the models of :mod:`models`: ``python -m train`` and the library entry :func:`run`.

Example::

    from train import TrainConfig, run

    summary = run(TrainConfig(preset="spark-tiny", steps=200, output_dir="runs/spark"))
    print(summary["final_eval_loss"], summary["ffn_tls"])

Files: :mod:`train.config` (TrainConfig), :mod:`train.cli` (flags), :mod:`train.data` and
:mod:`train.corpus` (tokens), :mod:`train.optimizer`, :mod:`train.state` and :mod:`train.mesh`
(placement), :mod:`train.step` (jitted steps), :mod:`train.checkpoint` and :mod:`train.run_dir`
(orbax, resuming), :mod:`train.metrics_log`, :mod:`train.plot`, :mod:`train.report`, :mod:`train.loop`.
"""

from train.config import TrainConfig


def run(train_config: TrainConfig, model_config=None, **kwargs) -> dict:
    """Trains and returns a summary dict; see :func:`train.loop.run` (imported lazily: it loads jax)."""
    from train.loop import run as _run  # noqa: PLC0415

    return _run(train_config, model_config, **kwargs)


__all__ = ["TrainConfig", "run"]
