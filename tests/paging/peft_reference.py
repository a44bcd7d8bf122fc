"""Plain Hugging Face transformers + PEFT greedy decoding: the outside reference."""

from __future__ import annotations

import torch


class PeftReference:
    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        self.model = None
        self.names: dict[str, str] = {}

    def _select(self, adapter: str):
        from peft import PeftModel

        if adapter not in self.names:
            name = f"a{len(self.names)}"
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, adapter, adapter_name=name).eval()
            else:
                self.model.load_adapter(adapter, adapter_name=name)
            self.names[adapter] = name
        self.model.set_adapter(self.names[adapter])
        return self.model

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: str | None, max_tokens: int):
        """(token ids, logprob of each chosen token), recomputing the whole sequence."""
        if adapter is None:
            model = self.base if self.model is None else None
            ctx = self.model.disable_adapter() if model is None else torch.no_grad()
            model = model or self.model
        else:
            model, ctx = self._select(adapter), torch.no_grad()
        ids, lps = list(prompt), []
        with ctx:
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                tok = int(torch.argmax(logp))
                ids.append(tok)
                lps.append(float(logp[tok]))
        return ids[len(prompt):], lps
