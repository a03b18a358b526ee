"""Load the released-shape Qwen3-Omni (base HF folder) + the exported PEFT adapter with transformers, generate.

    python bench/full_depth_generate.py results/model/hf results/export/adapter --out result.json

The check issue 21 asks of the full-depth run: the exported model loads with `from_pretrained` and generates. Prints
load and generation times, peak GPU memory and the generated token ids (random weights: the text is noise, the point is
that the adapter folder loads onto the released architecture and the forward + KV-cache decode run).

    python bench/full_depth_generate.py results/model/hf results/export/adapter --out g.json --device cpu
runs it on the tiny model after `snakemake export --configfile config/lora-demo.yaml` (session 10 on transformers
5.25.0 + peft: 24 adapter modules loaded, 16 tokens generated)."""

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cpu: the smoke run on the tiny model (LoRA demo export)")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

    started = time.perf_counter()
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(args.base, dtype=torch.bfloat16,
                                                                 device_map=args.device, use_kernels=False)
    loaded_s = time.perf_counter() - started
    model = PeftModel.from_pretrained(model, args.adapter).eval()
    adapter_s = time.perf_counter() - started - loaded_s
    thinker = model.base_model.model.thinker
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
    synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        out = thinker.generate(input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False)
    synchronize()
    generate_s = time.perf_counter() - started
    new = out[0, ids.shape[1]:].tolist()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if on_gpu else None
    record = {"load_s": round(loaded_s, 1), "adapter_load_s": round(adapter_s, 1), "generate_s": round(generate_s, 2),
              "new_tokens": len(new), "token_ids": new, "peak_gpu_gib": peak,
              "adapter_modules": sum(1 for name, _ in thinker.named_modules() if name.endswith("lora_A"))}
    print(json.dumps(record))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
