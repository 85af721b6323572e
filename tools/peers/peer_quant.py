#!/usr/bin/env python
"""Quantize an ONNX float model with a peer tool (NNCF or AIMET-ONNX) into plain ONNX QDQ.

Runs inside the peers' virtual environment (``cache/peers-venv``: torch CPU, nncf, aimet-onnx),
never in the project's: ``tools/bench_peers.py`` calls it once per peer model, as a subprocess.
It reads only numpy arrays and ONNX files and writes one ONNX model and one JSON file of facts
(seconds per stage, settings, versions, notes), so the bench needs none of these packages.

    python tools/peers/peer_quant.py check
    python tools/peers/peer_quant.py nncf  --float F.onnx --calib X.npy --out O.onnx --info O.json
                                           [--bits 8] [--full-bias-correction]
    python tools/peers/peer_quant.py aimet --float F.onnx --calib X.npy --out O.onnx --info O.json
                                           --algo ptq|adaround|seqmse [--bits 4|8] [--per-tensor]
                                           [--from-ort Q.onnx] [--iterations N] [--images N] [--batch B]

``check`` prints one JSON line: the version of each peer package, or why it does not import.

``aimet --from-ort Q.onnx`` is the peer of "improve an existing QDQ model": the sim is built from
the float model, ONNX Runtime's scales and zero points (weights and activations) are read from Q's
Q/DQ nodes, renamed to the float model's tensors, loaded into the sim and frozen
(``load_encodings_to_sim(..., allow_overwrite=False)``); ``--algo adaround`` then optimises only the
rounding of the float weights on ORT's grid, and ``ptq`` exports ORT's grid as AIMET rounds it (a
sanity check: it should score as Q does).

Every export is ``sim.to_onnx_qdq(prequantize_constants=True, export_int32_bias=True)``: integer
weights and int32 biases behind DequantizeLinear, what ONNX Runtime's own quantizer writes.

Exit codes: 0 done; 2 the tool refused or failed (one line on stderr starting with ``error:``);
3 the tool is not installed in this interpreter (one line starting with ``missing:``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np


class Missing(Exception):
    """The peer package does not import in this interpreter."""


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "nncf", "aimet-onnx", "onnx", "onnxruntime", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check() -> dict:
    """Which peers import here, and their versions (or the import error)."""
    res = {"python": sys.version.split()[0], "versions": versions(), "nncf": None, "aimet": None}
    for key, mod in (("nncf", "nncf"), ("aimet", "aimet_onnx")):
        try:
            __import__(mod)
            res[key] = "ok"
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
            res[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return res


def load_calib(path: str, n: int | None) -> np.ndarray:
    x = np.load(path, mmap_mode="r")
    if n is not None:
        x = x[:n]
    return np.ascontiguousarray(x, dtype=np.float32)


def input_name(model) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


# --------------------------------------------------------------------------- NNCF
def run_nncf(args, info: dict) -> onnx.ModelProto:  # noqa: F821
    import onnx

    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    except Exception as exc:  # noqa: BLE001
        raise Missing(f"nncf does not import: {type(exc).__name__}: {exc}") from exc
    model = onnx.load(args.float)
    x = load_calib(args.calib, args.images)
    name = input_name(model)
    dataset = nncf.Dataset([x[i : i + 1] for i in range(len(x))], lambda item: {name: item})
    kwargs = {"subset_size": len(x)}
    if args.full_bias_correction:
        kwargs["fast_bias_correction"] = False
    if args.bits != 8:
        # NNCF's ONNX backend has no int4 path for nncf.quantize; ask for it the documented way and
        # let NNCF say what it thinks of it (the bench reports the message).
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(num_bits=args.bits)
        )
    info["settings"] = {
        "weights": f"int{args.bits}",
        "granularity": "NNCF default (per-channel weights, per-tensor activations)",
        "calibration_images": len(x),
        "fast_bias_correction": not args.full_bias_correction,
        "subset_size": len(x),
    }
    t = time.time()
    q = nncf.quantize(model, dataset, **kwargs)
    info["seconds"]["quantize"] = time.time() - t
    return q


# --------------------------------------------------------------------------- AIMET
AIMET_CONFIG = {True: "default_config_per_channel.json", False: "default_config.json"}


def aimet_config(per_channel: bool) -> str:
    import aimet_onnx

    base = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config"
    path = base / AIMET_CONFIG[per_channel]
    return str(path) if path.exists() else ("default" if per_channel else str(path))


def ort_encodings(ort_path: str, float_model) -> tuple[list[dict], list[str]]:
    """ONNX Runtime's scales and zero points from Q's Q/DQ nodes, named as the float model's tensors.

    Constants (weights; skl2onnx's int8 Add biases): the DequantizeLinear output a node of Q reads is
    renamed to the initializer the node of the same name reads at the same input in the float model.
    Activations keep their names (ORT quantizes float-model tensors; where it dropped a Relu, it
    quantizes the Relu's output name), except a Cast of the graph input (skl2onnx), whose output ORT
    quantizes and AIMET its input. int32 biases are left out: AIMET's default config does not quantize
    them and the int32 export derives them from input x weight scales, as ORT does.
    Returns (encodings, names not mapped)."""
    import onnx
    from aimet_onnx.common.onnx._utils import _remove_onnx_qdq_nodes

    q = onnx.load(ort_path)
    # which node of Q reads each DQ output, at which input
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    readers: dict[str, tuple[str, int]] = {}
    for node in q.graph.node:
        for i, name in enumerate(node.input):
            if name in dq_out and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                readers.setdefault(name, (node.name, i))
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {i.name for i in float_model.graph.initializer}
    float_tensors = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    # a float->float Cast (skl2onnx's first node): ORT quantizes its output, AIMET its input
    cast_of = {
        n.output[0]: n.input[0]
        for n in float_model.graph.node
        if n.op_type == "Cast" and n.input[0] in {i.name for i in float_model.graph.input}
    }
    encs = _remove_onnx_qdq_nodes(copy.deepcopy(q))
    out, unmapped = [], []
    for e in encs:
        name = e["name"]
        if e.get("output_dtype") == "int32":
            continue  # bias
        if name in readers and name not in float_tensors:
            # a constant behind DequantizeLinear: the float model's initializer at the same input
            node_name, idx = readers[name]
            fnode = float_nodes.get(node_name)
            if fnode is None or len(fnode.input) <= idx or fnode.input[idx] not in float_inits:
                unmapped.append(name)
                continue
            e = dict(e, name=fnode.input[idx])
        elif name in cast_of:
            e = dict(e, name=cast_of[name])
        elif name not in float_tensors and name not in float_inits:
            unmapped.append(name)
            continue
        out.append(e)
    return out, unmapped


def weight_scales(model) -> dict[str, tuple]:
    """node name -> (scale, zero point, dtype) of the DequantizeLinear behind its weight (input 1)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in dq:
            d = dq[node.input[1]]
            if d.input[0] not in inits or d.input[1] not in inits:
                continue
            zp = numpy_helper.to_array(inits[d.input[2]]) if len(d.input) > 2 and d.input[2] in inits else None
            out[node.name] = (
                numpy_helper.to_array(inits[d.input[1]]).astype(np.float64).ravel(),
                None if zp is None else zp.astype(np.int64).ravel(),
                inits[d.input[0]].data_type,
            )
    return out


def grid_check(ort_path: str, exported) -> dict:
    """Do the exported model's weights sit on ORT's grid (same scale, zero point and integer type)?"""
    import onnx

    theirs, mine = weight_scales(onnx.load(ort_path)), weight_scales(exported)
    same, differ = [], []
    for name, (s, z, t) in theirs.items():
        m = mine.get(name)
        ok = (
            m is not None
            and m[2] == t
            and m[0].shape == s.shape
            and np.allclose(m[0], s, rtol=1e-6, atol=0)
            and (z is None or m[1] is None or np.array_equal(np.broadcast_to(z, m[1].shape), m[1]))
        )
        (same if ok else differ).append(name)
    return {"weights_on_ort_grid": len(same), "weights": len(theirs), "differ": differ}


def split_float_outputs(model):
    """The model cut down to its float outputs, or None when it has no others.

    skl2onnx classifiers end in a label branch (ArgMax -> ArrayFeatureExtractor -> Reshape -> Cast,
    no weights) beside the float probabilities; AIMET's AdaRound and SeqMSE fail on it (ONNX Runtime:
    "ArrayFeatureExtractor ... num_indices = 0"), so AIMET gets the model without it and
    `reattach` puts the branch back on the exported model."""
    import onnx

    outs = list(model.graph.output)
    keep = [o for o in outs if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not keep or len(keep) == len(outs):
        return None
    need = {o.name for o in keep}
    nodes = []
    for node in reversed(model.graph.node):
        if any(o in need for o in node.output):
            nodes.append(node)
            need |= set(node.input)
    cut = copy.deepcopy(model)
    del cut.graph.node[:]
    cut.graph.node.extend(reversed(nodes))
    del cut.graph.output[:]
    cut.graph.output.extend(keep)
    used = {i for n in cut.graph.node for i in n.input}
    inits = [i for i in cut.graph.initializer if i.name in used]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(inits)
    return cut


def reattach(exported, float_model):
    """Copy onto `exported` the float model's nodes that compute the outputs it lacks (the label branch)."""
    g = exported.graph
    have = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    missing = [o for o in float_model.graph.output if o.name not in {x.name for x in g.output}]
    need = {o.name for o in missing}
    extra = []
    for node in reversed(float_model.graph.node):
        if any(o in need and o not in have for o in node.output):
            extra.append(node)
            need |= {i for i in node.input if i not in have}
    g.node.extend(reversed(extra))
    used = {i for n in extra for i in n.input}
    g.initializer.extend(i for i in float_model.graph.initializer if i.name in used and i.name not in have)
    order = [o.name for o in float_model.graph.output]
    outs = {o.name: o for o in g.output} | {o.name: o for o in missing}
    del g.output[:]
    g.output.extend(outs[n] for n in order if n in outs)
    domains = {o.domain for o in exported.opset_import}
    for o in float_model.opset_import:
        if o.domain not in domains:
            exported.opset_import.append(o)
    return [n.op_type for n in reversed(extra)]


def run_aimet(args, info: dict) -> onnx.ModelProto:  # noqa: F821
    import onnx

    try:
        from aimet_onnx import QuantizationSimModel, apply_adaround, apply_seq_mse, int4, int8
        from aimet_onnx.quantsim import load_encodings_to_sim
    except Exception as exc:  # noqa: BLE001
        raise Missing(f"aimet_onnx does not import: {type(exc).__name__}: {exc}") from exc
    full = onnx.load(args.float)
    model = split_float_outputs(full) or full
    name = input_name(model)
    x = load_calib(args.calib, None)
    n_opt = min(args.images or len(x), len(x))
    bs = args.batch
    calib = [{name: x[i : i + bs]} for i in range(0, len(x), bs)]
    opt = [{name: x[i : min(i + bs, n_opt)]} for i in range(0, n_opt, bs)]
    per_channel = not args.per_tensor
    t0 = time.time()
    sim = QuantizationSimModel(
        copy.deepcopy(model),
        param_type=int4 if args.bits == 4 else int8,
        activation_type=int8,
        quant_scheme="min_max",
        config_file=aimet_config(per_channel),
        providers=["CPUExecutionProvider"],
    )
    info["seconds"]["sim"] = time.time() - t0
    settings = {
        "weights": f"int{args.bits} symmetric",
        "activations": "8-bit asymmetric (exported as uint8)",
        "granularity": "per-channel weights" if per_channel else "per-tensor weights",
        "quant_scheme": "min_max",
        "calibration_images": len(x),
    }
    if args.from_ort:
        t = time.time()
        encs, unmapped = ort_encodings(args.from_ort, model)
        known = set(sim.qc_quantize_op_dict)
        enabled = {k for k, v in sim.qc_quantize_op_dict.items() if v is not None and v.enabled}
        usable = [e for e in encs if e["name"] in enabled]
        skipped = sorted({e["name"] for e in encs} - enabled)
        unmapped += [s for s in skipped if s not in known]
        load_encodings_to_sim(
            sim,
            {"version": "2.0.0", "encodings": usable},
            strict=False,
            allow_overwrite=False,
            disable_missing_quantizers=False,
        )
        free = sorted(enabled - {e["name"] for e in usable})
        info["seconds"]["load_ort_encodings"] = time.time() - t
        settings["from_ort"] = os.path.basename(args.from_ort)
        info["ort_encodings"] = {
            "loaded_frozen": len(usable),
            "of_sim_quantizers_enabled": len(enabled),
            "ort_not_in_sim": sorted(set(unmapped) | set(skipped)),
            "sim_not_from_ort": free,
        }
    t1 = time.time()
    if args.algo == "adaround":
        apply_adaround(sim, opt, num_iterations=args.iterations)
        settings.update(adaround_iterations=args.iterations, adaround_images=n_opt, adaround_batch=bs)
    elif args.algo == "seqmse":
        apply_seq_mse(sim, opt, num_candidates=args.candidates)
        settings.update(seqmse_candidates=args.candidates, seqmse_images=n_opt)
    info["seconds"]["algorithm"] = time.time() - t1
    t2 = time.time()
    sim.compute_encodings(calib)
    info["seconds"]["compute_encodings"] = time.time() - t2
    t3 = time.time()
    q = sim.to_onnx_qdq(prequantize_constants=True, export_int32_bias=True)
    if model is not full:
        ops = reattach(q, full)
        info["label_branch"] = (
            "AIMET quantized the model without its non-float outputs' branch ("
            + " -> ".join(ops)
            + ", no weights), which was put back on the exported model"
        )
    info["seconds"]["export"] = time.time() - t3
    info["settings"] = settings
    if args.from_ort:
        info["grid_check"] = grid_check(args.from_ort, q)
    return q


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tool", choices=["check", "nncf", "aimet"])
    ap.add_argument("--float")
    ap.add_argument("--calib", help=".npy of model-ready calibration inputs (float32)")
    ap.add_argument("--out")
    ap.add_argument("--info", help="write the facts of the run (JSON) here")
    ap.add_argument("--bits", type=int, default=8, choices=[4, 8])
    ap.add_argument("--full-bias-correction", action="store_true", help="nncf: fast_bias_correction=False")
    ap.add_argument("--algo", default="ptq", choices=["ptq", "adaround", "seqmse"])
    ap.add_argument("--per-tensor", action="store_true", help="aimet: per-tensor weights (default per-channel)")
    ap.add_argument("--from-ort", help="aimet: load and freeze this ONNX Runtime QDQ model's encodings")
    ap.add_argument("--iterations", type=int, default=1000, help="adaround iterations per layer")
    ap.add_argument("--candidates", type=int, default=20, help="seqmse candidates per weight")
    ap.add_argument("--images", type=int, help="images for adaround/seqmse (nncf: calibration size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)

    if args.tool == "check":
        print(json.dumps(check()))
        return 0
    if args.threads:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except Exception:  # noqa: BLE001
            pass
    info: dict = {"tool": args.tool, "argv": sys.argv[1:], "versions": versions(), "seconds": {}}
    t = time.time()
    try:
        model = run_nncf(args, info) if args.tool == "nncf" else run_aimet(args, info)
        import onnx

        tmp = args.out + ".tmp"
        onnx.save(model, tmp)
        os.replace(tmp, args.out)
    except Missing as exc:
        print(f"missing: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # noqa: BLE001 - the bench turns this line into the row's note
        traceback.print_exc()
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {type(exc).__name__}: {msg[:400]}", file=sys.stderr)
        info["error"] = f"{type(exc).__name__}: {msg}"
        if args.info:
            Path(args.info).write_text(json.dumps(info, indent=2, default=str) + "\n")
        return 2
    info["seconds"]["total"] = time.time() - t
    if args.info:
        Path(args.info).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
