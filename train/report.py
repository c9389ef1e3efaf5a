"""The short report printed at the end of ``python -m train``."""

from __future__ import annotations


def _number(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(summary: dict) -> str:
    """Final losses (and the dense twin's), sparsity reached, size, speed and where the outputs are."""
    lines = [f"run {summary['run_dir']}: {summary['ffn']} FFN, step {summary['step']}"
             + (f" (resumed from step {summary['start_step']})" if summary.get("start_step") else ""),
             f"  data:               {summary['data']}",
             f"  final train loss:   {_number(summary['final_loss'])} (cross entropy, nats/token)",
             f"  final eval loss:    {_number(summary['final_eval_loss'])} (held-out)"]
    twin = summary.get("dense_twin")
    if twin:
        lines.append(f"  dense twin:         train {_number(twin['final_loss'])}, eval {_number(twin['final_eval_loss'])}"
                     f" ({twin['parameters']:,} parameters)")
        if summary["final_eval_loss"] is not None and twin["final_eval_loss"] is not None:
            lines.append(f"  eval loss gap:      {summary['final_eval_loss'] - twin['final_eval_loss']:+.4f} "
                         "(this model minus dense twin)")
    sparsity = [f"FFN TLS {_number(summary['ffn_tls'], '.3f')}", f"FFN CLS {_number(summary['ffn_cls'], '.3f')}",
                f"attention density {_number(summary['attention_density'], '.3f')}"]
    if summary.get("expert_load_imbalance") is not None:
        sparsity.append(f"expert load imbalance {summary['expert_load_imbalance']:.3f}")
    lines += [f"  sparsity (eval):    {', '.join(sparsity)}",
              f"  parameters:         {summary['parameters']:,}",
              f"  tokens/s:           {_number(summary['tokens_per_second'], ',.0f')} ({summary['mesh']})",
              f"  wall time:          {summary['seconds']:.1f} s" + (f" (+ dense twin {twin['seconds']:.1f} s)" if twin else ""),
              f"  checkpoint:         {summary['checkpoint_dir']}"
              + (f" (step {summary['checkpoint_step']})" if summary.get("checkpoint_step") is not None else ""),
              f"  metrics:            {summary['metrics_file']}"]
    if summary.get("plot"):
        lines.append(f"  plot:               {summary['plot']}")
    return "\n".join(lines)
