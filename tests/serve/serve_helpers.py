"""Tiny base models and PEFT adapter directories shared by the serving tests."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lorakit import zoo  # noqa: E402

TARGETS = {"tiny-llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "byte-llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "tiny-gpt2": ["c_attn", "c_proj"],
           "tiny-gemma": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def load_model(name: str):
    """(model, tokenizer): a zoo name; `byte-llama` (tiny Llama whose 260 ids are all bytes, so every token is
    text); `tiny-gemma` (Gemma 3 text, mixed sliding/full attention)."""
    if name == "byte-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        from lorakit.data import byte_tokenizer

        config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForCausalLM(config).eval(), byte_tokenizer()
    if name != "tiny-gemma":
        return zoo.load(name, "causal_lm")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lorakit.data import byte_tokenizer

    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
    return model, byte_tokenizer()


def make_adapter(path, model_name="tiny-llama", r=8, seed=0, targets=None, via="peft", alpha=None):
    """A PEFT directory with random non-zero factors, written by `peft` or by lorakit."""
    base, _ = load_model(model_name)
    targets = targets or TARGETS[model_name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if via == "peft":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets, init_lora_weights=False)
            get_peft_model(base, config).save_pretrained(str(path))
        else:
            import lorakit

            model = lorakit.apply(base, lorakit.LoRAConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets))
            for a in lorakit.adapters(model).values():
                torch.nn.init.normal_(a.lora_B.weight, std=0.2)
            lorakit.save_peft(model, path)
    return path


def peft_greedy(model_name, adapter_dir, prompt, max_new_tokens):
    """Greedy continuation of one prompt by `peft` with a single adapter (None: the base model)."""
    from peft import PeftModel

    base, _ = load_model(model_name)
    model = PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class ServeProcess:
    """`lorakit serve ARGS` as a user runs it, on a free loopback port; ``url`` once /health answers."""

    def __init__(self, args, api_key=None, timeout=120):
        import socket
        import subprocess
        import sys
        import time

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if api_key:
            env["LORAKIT_API_KEY"] = api_key
        cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("the server did not come up: " + self.output())

    def output(self) -> str:
        return self.proc.stdout.read().decode(errors="replace")[-4000:] if self.proc.poll() is not None else ""

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def scaled_adapter(source, target, value):
    """A copy of the adapter at ``source`` whose B factors are all ``value`` (huge, or NaN)."""
    from lorakit import load_state, save_state

    state = load_state(source)
    for tensors in state.tensors.values():
        tensors["lora_B.weight"] = torch.full_like(tensors["lora_B.weight"], value)
    save_state(state, target)
    return target


def raw_request(port: int, request: bytes, read: bool = True) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side path normalisation); the status code and the answer's head
    ((0, b"") when not read: the client leaves at once)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        if not read:
            return 0, b""
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def hostile_adapters(root, model_name, good, r=4):
    """Under ``root``: ``good`` (a working adapter), ``huge`` (B = 1e37), ``nan`` (B = NaN) and ``later`` (a
    config beside a truncated weights file: it loads once the file is replaced)."""
    import shutil

    make_adapter(root / good, model_name, r=r)
    scaled_adapter(root / good, root / "huge", 1e37)
    scaled_adapter(root / good, root / "nan", float("nan"))
    (root / "later").mkdir()
    shutil.copy(root / good / "adapter_config.json", root / "later")
    (root / "later" / "adapter_model.safetensors").write_bytes(b"truncated")
    return root
