"""``dqrm export``: a checkpoint (QAT, or FP32 for post-training quantization) to a packed INT-N artifact.

Writes ``summary.json`` into the artifact directory and returns its path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str]) -> str:
    """Run ``dqrm export``; returns the path of the summary it wrote."""
    parser = argparse.ArgumentParser(prog="dqrm export", description="Export a checkpoint to a packed INT-N artifact")
    parser.add_argument("--ckpt", required=True, help="checkpoint (QAT, or FP32 for post-training quantization)")
    parser.add_argument("--out", required=True, help="artifact directory")
    parser.add_argument("--embedding-bits", type=int, default=None, help="FP32 checkpoints: PTQ table bits")
    parser.add_argument("--mlp-bits", type=int, default=None, help="FP32 checkpoints: PTQ MLP weight bits")
    parser.add_argument(
        "--ptq-scales",
        choices=("trained", "init"),
        default="trained",
        help="PTQ scales from the trained tables (honest) or the initial ones (the reference code's)",
    )
    parser.add_argument("--mlp", choices=("quantized", "fp32"), default="quantized", help="MLP weights in the artifact")
    parser.add_argument(
        "--force", action="store_true", help="replace --out even if it holds files that are not a previous artifact"
    )
    args = parser.parse_args(argv)
    from dqrm_lightning.export.artifact import entry_name
    from dqrm_lightning.export.exporter import export_checkpoint

    start = time.perf_counter()
    manifest = export_checkpoint(
        args.ckpt,
        args.out,
        embedding_bits=args.embedding_bits,
        mlp_bits=args.mlp_bits,
        ptq_scales=args.ptq_scales,
        quantize_mlp=args.mlp == "quantized",
        force=args.force,
    )
    sizes = manifest["bytes"]
    bits = sorted({t["bits"] for t in manifest["tables"]})
    print(
        f"exported {args.ckpt} -> {args.out}: table bits {bits}, {manifest['quantization']}, "
        f"{sizes['payload']:,} bytes = {sizes['ratio']:.4f} x the FP32 model ({sizes['fp32_model']:,} bytes)"
    )
    summary = {
        "command": "export",
        "artifact": str(args.out),
        "quantization": manifest["quantization"],
        "bytes": sizes,
        "table_bits": {entry_name(t): t["bits"] for t in manifest["tables"]},
        "mlp_bits": {layer["name"]: layer["bits"] for layer in manifest["mlp"]},
        "seconds": time.perf_counter() - start,
    }
    path = Path(args.out) / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return str(path)
