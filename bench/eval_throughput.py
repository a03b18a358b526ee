"""The evaluate stage's two phases on one GPU, timed: scoring forward (mcore) and greedy generation (transformers).

    python bench/eval_throughput.py --shards results/data/shards --out bench/results/eval               # GPU
    python bench/eval_throughput.py --shards results/data/shards --tiny --out /tmp/eval_bench          # CPU smoke run

On a lent GPU machine (no registry: the wheels of shared/tools/device-wheels.sh carried in .whl/, shards carried):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 bench/eval_throughput.py --shards .devcarry/shards --out $OUT/eval

Model: the released 30B-A3B shapes (hidden 2048, 32/4 heads x 128, 128 experts top-8, expert FFN 768, vocab 152064,
the real vision and audio towers; transformers' model also the released talker and code2wav, as the stage loads it)
cut to `--layers` LLM layers (a comma list, e.g. 4,8, also fits a line per phase through the depths and extrapolates
time and memory to the released 48 layers), random weights, bf16 (fp32 on CPU). `--tiny`: the embedded tiny config.

Samples: the first `--samples` (64) that the scoring loader gives of `--split` of the shards (the demo set's val split
has 19: `train` by default; Energon shuffles that split); the generate phase answers the same samples.

Phases, each in its own process (clean peak-memory statistics; the stage runs them in separate processes too), each
through the stage's own functions:
  scores    omni_model.eval.scores: the thinker built as the stage builds it (scoring_settings ->
            build_thinker_for_training; random weights instead of load_model_weights), the samples encoded by the
            training task encoder (split_batches, one unpacked sample per micro-batch: `encode_s`), then score_batches
            (mcore's schedule, forward_only, loss + vocab-parallel argmax) over all of them. tokens = every token of
            the samples (what the forward processes); answer_tokens = the scored ones.
  generate  omni_model.eval.generate: transformers' Qwen3OmniMoeForConditionalGeneration as load_model builds it, the
            prompts encoded as the stage encodes them (prompt_inputs: `encode_s`), then greedy_answer (KV cache) for
            each, `--max-new-tokens` at most. Random weights seldom emit <|im_end|>: nearly every answer runs to the
            cap, so the decode rate is that of full-length answers. `prefill_s`: the same prompts with one new token
            each (a pass before the timed one; it also warms the kernels up), so decode ~ run_s - prefill_s.
Before each timed pass, `--warmup` samples run once untimed (kernel selection, allocator growth). Per phase: build
time, encode time, run time, tokens/s, GPU memory after the build (the weights), peak allocated and peak reserved
(what must fit the card; `--fit-gib`, default 78 for an H100 80GB, is checked against the reserved peak).
Writes `--out`/eval_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

RELEASED_LAYERS = 48
PHASES = ("scores", "generate")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gib(value: int) -> float:
    return value / 2**30


def memory(device: str) -> dict:
    """Peak GPU memory of this process so far (allocated and reserved); the resident set on CPU."""
    if device != "cuda":
        import resource

        return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "reserved_gib": None}
    return {"peak_gib": gib(torch.cuda.max_memory_allocated()), "reserved_gib": gib(torch.cuda.max_memory_reserved())}


def timed(device: str, work):
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return result, time.perf_counter() - start


# -- phase: scores -------------------------------------------------------------------------------------------------
def scores_phase(spec: dict) -> dict:
    from planner_check import init_weights

    from omni_model.eval.run import Evaluation, scoring_settings
    from omni_model.eval.scores import score_batches, split_batches
    from omni_model.runtime.parallel import destroy_parallel
    from omni_model.train.build import build_thinker_for_training, init_training_parallel

    device, seq = spec["device"], spec["max_seq_len"]
    launch = {"gpus_per_node": 1, "cpu_procs": 1} if device == "cuda" else {"gpus_per_node": 0, "cpu_procs": 1}
    evaluation = Evaluation(name="bench", checkpoint="", mcore_dir=spec["hf_dir"], hf_dir=spec["hf_dir"],
                            shards=spec["shards"], processed="", split=spec["split"], launch=launch,
                            data={"max_seq_len": seq})
    settings = scoring_settings(evaluation, Path(spec["work"]))
    settings.validate()

    def build():
        init_training_parallel(settings)
        thinker = build_thinker_for_training(settings)
        init_weights(thinker)  # what load_model_weights fills in the stage
        return thinker

    try:
        thinker, build_s = timed(device, build)
        weights = gib(torch.cuda.memory_allocated()) if device == "cuda" else None
        batches, encode_s = timed(device, lambda: split_batches(settings, spec["split"], spec["samples"]))
        _, warmup_s = timed(device, lambda: score_batches(thinker, batches[:spec["warmup"]], seq))
        rows, run_s = timed(device, lambda: score_batches(thinker, batches, seq))
    finally:
        destroy_parallel()
    tokens = sum(batch.num_tokens for batch in batches)
    return {"samples": len(rows), "build_s": build_s, "encode_s": encode_s, "warmup_s": warmup_s, "run_s": run_s,
            "tokens": tokens, "answer_tokens": sum(row["tokens"] for row in rows), "tokens_per_s": tokens / run_s,
            "samples_per_s": len(rows) / run_s, "weights_gib": weights, **memory(device),
            "ids": [batch.sample_ids[0][0] for batch in batches]}


# -- phase: generate -----------------------------------------------------------------------------------------------
def build_generation_model(hf_dir: str, device: str):
    """The full model load_model builds (thinker, talker, code2wav), from the same config.json, random weights."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = Qwen3OmniMoeConfig.from_pretrained(hf_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return model.eval()


def generate_phase(spec: dict) -> dict:
    from omni_model.data.encoder import OmniEncoder
    from omni_model.eval.generate import greedy_answer, prompt_inputs, split_samples, stop_ids

    device, hf_dir = spec["device"], spec["hf_dir"]
    model, build_s = timed(device, lambda: build_generation_model(hf_dir, device))
    weights = gib(torch.cuda.memory_allocated()) if device == "cuda" else None
    encoder = OmniEncoder(Path(hf_dir), max_seq_len=spec["max_seq_len"])
    stop, pad = stop_ids(encoder.chat.tokenizer), encoder.pad_id
    samples = list(split_samples(Path(spec["shards"]), spec["split"], 10**9 if spec.get("ids") else spec["samples"]))
    if spec.get("ids"):  # the samples the scores phase read (Energon's train split comes shuffled), in its order
        by_id = {sample["record"]["id"]: sample for sample in samples}
        samples = [by_id[sample_id] for sample_id in spec["ids"]]
    prompts, encode_s = timed(device, lambda: [prompt_inputs(encoder, sample)[0] for sample in samples])

    def answer_all(chosen, new_tokens):
        return [greedy_answer(model, inputs, new_tokens, stop, pad) for inputs in chosen]

    _, warmup_s = timed(device, lambda: answer_all(prompts[:spec["warmup"]], spec["max_new_tokens"]))
    _, prefill_s = timed(device, lambda: answer_all(prompts, 1))
    answers, run_s = timed(device, lambda: answer_all(prompts, spec["max_new_tokens"]))
    new_tokens = sum(len(answer) for answer in answers)
    prompt_tokens = sum(int(inputs["input_ids"].shape[1]) for inputs in prompts)
    decode_s = max(run_s - prefill_s, 1e-9)
    return {"samples": len(answers), "build_s": build_s, "encode_s": encode_s, "warmup_s": warmup_s,
            "prefill_s": prefill_s, "run_s": run_s, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "full_length_answers": sum(len(answer) == spec["max_new_tokens"] for answer in answers),
            "tokens": prompt_tokens + new_tokens, "tokens_per_s": (prompt_tokens + new_tokens) / run_s,
            "new_tokens_per_s": new_tokens / run_s, "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens_per_s": (new_tokens - len(answers)) / decode_s, "samples_per_s": len(answers) / run_s,
            "weights_gib": weights, **memory(device)}


def run_phase(spec: dict) -> dict:
    if spec["device"] == "cpu":
        torch.set_num_threads(1)
    return {"scores": scores_phase, "generate": generate_phase}[spec["phase"]](spec)


# -- driver --------------------------------------------------------------------------------------------------------
def write_hf_dir(work: Path, tiny: bool, layers: int) -> Path:
    """config.json + the real tokenizer and processor files at this depth (train_throughput's model config)."""
    from train_throughput import write_hf_dir as write

    return write(work / f"layers{layers}", tiny, layers)


def run_child(spec: dict, timeout: int) -> dict:
    """One phase in its own process (train_throughput's runner); its RESULT line, or why it failed."""
    from train_throughput import run_child as run_script

    return run_script(spec, timeout, cpu=spec["device"] == "cpu", script=__file__, require_success=True)


HEADER = (f"{'layers':>6s} {'phase':9s} {'samples':>7s} {'build s':>8s} {'encode s':>8s} {'run s':>7s} {'tokens':>7s} "
          f"{'tokens/s':>9s} {'weights GiB':>11s} {'peak GiB':>8s} {'reserved':>8s}  notes")


def _number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def row_line(layers: int, phase: str, r: dict) -> str:
    if "failed" in r:
        return f"{layers:>6d} {phase:9s} FAILED: {r['failed'][-800:]}"
    notes = (f"{r['answer_tokens']} answer tokens" if phase == "scores" else
             f"{r['new_tokens']} new tokens ({r['full_length_answers']} full-length), prefill {r['prefill_s']:.2f} s, "
             f"decode {r['decode_tokens_per_s']:.1f} tokens/s")
    return (f"{layers:>6d} {phase:9s} {r['samples']:>7d} {r['build_s']:>8.1f} {r['encode_s']:>8.1f} {r['run_s']:>7.2f} "
            f"{r['tokens']:>7d} {r['tokens_per_s']:>9.1f} {_number(r['weights_gib'], '>11.1f')} "
            f"{r['peak_gib']:>8.1f} {_number(r['reserved_gib'], '>8.1f')}  {notes}")


def extrapolate(rows: list, target: int) -> dict:
    """Per phase, a straight line through (layers, value) of the measured depths -> the value at `target` layers,
    for run time and peak memory (both grow with the LLM layers; the towers, embedding and head are the intercept)."""
    out = {}
    for phase in PHASES:
        points = [(r["layers"], r) for r in rows if r["phase"] == phase and "failed" not in r]
        if len({layers for layers, _ in points}) < 2:
            continue
        (l0, a), (l1, b) = min(points, key=lambda p: p[0]), max(points, key=lambda p: p[0])
        out[phase] = {key: a[key] + (b[key] - a[key]) * (target - l0) / (l1 - l0)
                      for key in ("run_s", "peak_gib", "reserved_gib", "weights_gib")
                      if isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="Energon shards (the demo set: results/data/shards)")
    ap.add_argument("--out", help="folder for eval_throughput.json")
    ap.add_argument("--layers", default="4", help="LLM layers, a comma list (e.g. 4,8: also a 48-layer estimate)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--split", default="train", help="split of the shards (the demo's val split has 19 samples)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer cap (eval.max_new_tokens' default)")
    ap.add_argument("--max-seq-len", type=int, default=4096, help="data.max_seq_len (the default config's)")
    ap.add_argument("--warmup", type=int, default=2, help="samples run untimed before each timed pass")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--tiny", action="store_true", help="the tiny config (CPU smoke run)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is present")
    ap.add_argument("--fit-gib", type=float, default=78.0, help="fail when a phase's reserved peak exceeds this "
                    "(an H100 80GB has ~78 GiB usable)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per phase")
    ap.add_argument("--work", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one phase (JSON spec) in this process
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_phase(json.loads(args.one))), flush=True)
        return 0
    if not args.shards or not args.out:
        ap.error("--shards and --out are required")
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    depths = [int(layers) for layers in args.layers.split(",") if layers.strip()]
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        ap.error(f"--phases: unknown {unknown}; choose from {list(PHASES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="eval_throughput_"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    began = time.perf_counter()
    print(f"device {name}; {args.samples} samples of the {args.split} split of {args.shards}; "
          f"{'tiny' if args.tiny else '30B-A3B shapes'}, layers {depths}", flush=True)
    print(HEADER, flush=True)
    rows = []
    for layers in depths:
        hf_dir = write_hf_dir(work, args.tiny, layers)
        for phase in phases:
            spec = {"phase": phase, "device": device, "hf_dir": str(hf_dir), "shards": str(Path(args.shards).resolve()),
                    "split": args.split, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                    "max_seq_len": args.max_seq_len, "warmup": args.warmup, "work": str(work)}
            scored = [r for r in rows if r["layers"] == layers and r["phase"] == "scores" and "ids" in r]
            spec["ids"] = scored[0]["ids"] if scored else None  # answers to the samples just scored
            result = run_child(spec, args.timeout)
            print(row_line(layers, phase, result), flush=True)
            rows.append({"layers": layers, "phase": phase, **result})
    problems = [f"{r['layers']} layers {r['phase']}: failed" for r in rows if "failed" in r]
    problems += [f"{r['layers']} layers {r['phase']}: {r['samples']} samples, not {args.samples}"
                 for r in rows if "failed" not in r and r["samples"] != args.samples]
    problems += [f"{r['layers']} layers {r['phase']}: reserved peak {r['reserved_gib']:.1f} GiB > {args.fit_gib}"
                 for r in rows if (r.get("reserved_gib") or 0) > args.fit_gib]
    estimate = {} if args.tiny else extrapolate(rows, RELEASED_LAYERS)
    for phase, values in estimate.items():
        print(f"{RELEASED_LAYERS:>6d} {phase:9s} (straight line through the measured depths) run "
              f"{values.get('run_s', 0):.1f} s, peak {values.get('peak_gib', 0):.1f} GiB", flush=True)
    out = {"device": name, "model": ("tiny" if args.tiny else "30B-A3B shapes") + f", layers {depths}",
           "torch": torch.__version__, "samples": args.samples, "split": args.split,
           "max_new_tokens": args.max_new_tokens, "max_seq_len": args.max_seq_len, "warmup": args.warmup,
           "fit_gib": args.fit_gib, "rows": rows, f"estimate_{RELEASED_LAYERS}_layers": estimate,
           "problems": problems, "command": " ".join(sys.argv), "wall_s": time.perf_counter() - began}
    path = out_dir / "eval_throughput.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}" + "".join(f"\nPROBLEM: {p}" for p in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
