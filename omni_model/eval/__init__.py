"""The `evaluate` stage: base (the converted checkpoint) vs tuned (the training's `latest`) on the val split.

Two parts, one per question a user asks:

* `scores` (under torchrun, at the configured layout): our Megatron-Core thinker, the training forward with no
  gradients, gives the loss and next-token accuracy on the answer tokens of every sample; `summary` groups them per
  modality mix (text, image, audio, video, mixed) and per `source` field.
* `generate` (one process): greedy answers with a KV cache from transformers' Qwen3-Omni on the HF checkpoint of the
  same weights (the download for base, the export for tuned), scored by `metrics` (exact match, jiwer WER/CER,
  sacrebleu BLEU/chrF). transformers because its `generate` gives a KV cache, stopping criteria and multimodal
  prompts (positions of image/audio/video) for the released model today, and `device_map="auto"` spreads the 30B
  checkpoint over the GPUs of one host without a layout; mcore's inference engines (0.16 to 0.19) have no Qwen3-Omni
  multimodal prompt path (towers, deepstack, MRoPE) and would need one written and kept in step.

* `speech` (`generate.generate_speech`): spoken answers to the val samples whose last answer is spoken, through the
  same `generate` with the talker and code2wav (the tuned talker of finetune_talker in the export), greedy; their
  wavs, lengths against the reference speech, and whether the talker ended them. Their codes are not scored against
  the reference codes: the thinker's text differs from the reference's, so the talker speaks other words.
"""
