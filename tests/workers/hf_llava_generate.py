"""Run in a fresh Python with only transformers (no megatron_zero import): the exported HF LLaVA directory through
AutoProcessor + LlavaForConditionalGeneration + apply_chat_template + generate(). Prints one JSON line:
{"text": greedy answer, "pixel_values": the processor's pixels (nested lists)} per export, in order.

    python hf_llava_generate.py HF_DIR IMAGE PROMPT MAX_NEW_TOKENS [HF_DIR IMAGE PROMPT MAX_NEW_TOKENS ...]
"""
import json
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

assert not any(m.startswith("megatron_zero") for m in sys.modules)
args = sys.argv[1:]
for i in range(0, len(args), 4):  # several exports in one launch (one transformers import)
    hf_dir, image_path, prompt, max_new = args[i], args[i + 1], args[i + 2], int(args[i + 3])
    processor = AutoProcessor.from_pretrained(hf_dir)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(json.dumps({"text": answer, "input_ids": inputs["input_ids"][0].tolist(),
                      "pixel_values": inputs["pixel_values"][0].tolist()}), flush=True)
