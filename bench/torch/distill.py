"""PyTorch peer for the distillation benchmark (bench/gpu_distill.sh): the step time of the
student of recipes/gutenberg-student.yaml trained plain (CE only) and with the online teacher of
recipes/gutenberg-teacher.yaml, the way a PyTorch user (torchtune's KD recipe, ModelOpt) does it:
teacher forward under torch.no_grad with bf16 weights, student forward under bf16 autocast over FP32
master weights, loss = 0.5 * T^2 KL(teacher || student) (log_softmax of the logits / T, full
vocabulary, mean over tokens) + 0.5 * CE, backward, grad clip 1.0, fused AdamW (the recipe's lr,
betas 0.9/0.95, weight decay 0.1). Eager, then torch.compile (default mode: the two models and the
loss functions). Random seeded tokens at the student recipe's micro-batch and sequence (timing only).

  python3 bench/torch/distill.py [--steps 30] [--warmup 10] [--no-compile] [--temperature 1.0]
                                 [--model auto|hf|tessera]

--model hf: transformers' LlamaForCausalLM (attn_implementation="sdpa"), built from the recipe;
tessera: bench/torch/model.py (the other peers' model, Tessera's parameter layout); auto (default):
hf when transformers imports, else tessera. Median step time over --steps steps after --warmup
(torch.cuda.synchronize around each step). Prints greppable lines starting with "torch-":
  torch-eager plain_ms 7.91 / kd_ms 15.02 / kd_over_plain 1.90 / plain_tok_s ... / kd_tok_s ...
"""
import argparse
import os
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    sys.exit(f"distill.py: PyTorch is missing ({e}); this peer needs torch with CUDA")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

# The recipes' model sections as this peer was written for them (checked against the files).
EXPECTED = {
    "gutenberg-teacher": dict(family="llama", num_layers=8, hidden=640, num_heads=10,
                              num_kv_heads=5, ffn_hidden=1728, max_seq_len=512, rope_theta=10000),
    "gutenberg-student": dict(family="llama", num_layers=4, hidden=256, num_heads=4, num_kv_heads=2,
                              ffn_hidden=768, max_seq_len=512, rope_theta=10000),
}
LLAMA = dict(norm="rmsnorm", norm_eps=1e-6, position="rope", activation="swiglu", bias=False,
             tied_embeddings=False, qk_norm=False)  # Tessera's llama family defaults


def _scalar(s):
    s = s.strip().strip("'\"")
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(s.lower(), s)


def load_recipe(path):
    """pyyaml when present, else Tessera's recipe format: top-level sections of `key: scalar`."""
    text = open(path).read()
    try:
        import yaml
        return yaml.safe_load(text)
    except ImportError:
        pass
    out, section = {}, None
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(":")
        if not raw[0].isspace():
            section = None if value.strip() else out.setdefault(key, {})
            if value.strip():
                out[key] = _scalar(value)
        elif section is not None:
            section[key] = _scalar(value)
    return out


def model_section(path, vocab):
    name = os.path.basename(path).rsplit(".", 1)[0]
    m = dict((load_recipe(path) or {}).get("model") or {})
    exp = EXPECTED.get(name, {})
    diff = {k: (m.get(k), v) for k, v in exp.items() if str(m.get(k)) != str(v)}
    if diff:
        print(f"distill.py: note: {path} differs from what this peer was written for "
              f"(recipe, expected): {diff}; using the recipe", file=sys.stderr)
    if m.get("family", "llama") != "llama":
        sys.exit(f"distill.py: {path}: family {m.get('family')}; this peer builds llama only")
    if m.get("vocab_size", "auto") != "auto":
        vocab = int(m["vocab_size"])
    d = dict(LLAMA)
    d.update({k: m[k] for k in LLAMA if k in m})
    d.update(family="llama", vocab_size=vocab, padded_vocab_size=vocab,
             num_layers=int(m["num_layers"]), hidden=int(m["hidden"]),
             num_heads=int(m["num_heads"]), num_kv_heads=int(m.get("num_kv_heads", m["num_heads"])),
             ffn_hidden=int(m["ffn_hidden"]), max_seq_len=int(m["max_seq_len"]),
             rope_theta=float(m.get("rope_theta", 10000)), norm_eps=float(d["norm_eps"]))
    d["head_dim"] = int(m.get("head_dim", d["hidden"] // d["num_heads"]))
    return d


def build_hf(d):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden"],
                      intermediate_size=d["ffn_hidden"], num_hidden_layers=d["num_layers"],
                      num_attention_heads=d["num_heads"], num_key_value_heads=d["num_kv_heads"],
                      head_dim=d["head_dim"], max_position_embeddings=d["max_seq_len"],
                      rope_theta=d["rope_theta"], rms_norm_eps=d["norm_eps"],
                      tie_word_embeddings=bool(d["tied_embeddings"]), attention_bias=False,
                      mlp_bias=False, use_cache=False)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except TypeError:  # older transformers: set it on the config
        cfg._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(cfg)
    impl = getattr(model.config, "_attn_implementation", "?")
    if impl != "sdpa":
        print(f"distill.py: note: transformers chose attention '{impl}', not sdpa", file=sys.stderr)

    def fwd(m, tokens):
        return m(input_ids=tokens, use_cache=False).logits
    return model, fwd


def build_tessera(d):
    from model import Config, Transformer
    return Transformer(Config(d)), lambda m, tokens: m(tokens)[0]


def make_losses(V, temp):
    def ce_loss(logits, targets):
        return F.cross_entropy(logits[..., :V].reshape(-1, V).float(), targets.reshape(-1))

    def kd_loss(s_logits, t_logits, targets):
        s = s_logits[..., :V].reshape(-1, V).float()
        t = t_logits[..., :V].reshape(-1, V).float()
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        # KL(teacher || student) per token, mean over tokens, times T^2.
        kd = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * (temp * temp)
        return 0.5 * kd + 0.5 * F.cross_entropy(s, targets.reshape(-1))
    return ce_loss, kd_loss


def time_steps(step, batches, warmup, steps):
    """Median seconds per step over `steps` after `warmup` (wall time of the warm-up returned)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        b = batches[i % len(batches)]
        step(b[:, :-1], b[:, 1:])
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times, loss = [], None
    for i in range(steps):
        b = batches[i % len(batches)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(b[:, :-1], b[:, 1:])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), warm_s, float(loss)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=os.path.join(REPO, "recipes", "gutenberg-teacher.yaml"))
    ap.add_argument("--student", default=os.path.join(REPO, "recipes", "gutenberg-student.yaml"))
    ap.add_argument("--vocab", type=int, default=4096, help="for vocab_size: auto (CI tokenizer)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--model", choices=["auto", "hf", "tessera"], default="auto")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        sys.exit("distill.py: --steps and --warmup must be >= 1")
    if not torch.cuda.is_available():
        sys.exit("distill.py: no CUDA device visible to PyTorch")

    kind = args.model
    if kind in ("auto", "hf"):
        try:
            import transformers  # noqa: F401
            kind = "hf"
        except ImportError as e:
            if args.model == "hf":
                sys.exit(f"distill.py: --model hf needs transformers ({e})")
            print(f"distill.py: note: transformers missing ({e}); using bench/torch/model.py",
                  file=sys.stderr)
            kind = "tessera"
    if kind == "tessera":
        try:
            import model  # noqa: F401
        except ImportError as e:
            sys.exit(f"distill.py: bench/torch/model.py does not import ({e})")
    build = build_hf if kind == "hf" else build_tessera

    student_recipe = load_recipe(args.student)
    data, optim = student_recipe.get("data") or {}, student_recipe.get("optim") or {}
    B, T = int(data.get("micro_batch", 16)), int(data.get("seq_len", 512))
    ds, dt = model_section(args.student, args.vocab), model_section(args.teacher, args.vocab)
    if ds["vocab_size"] != dt["vocab_size"]:
        sys.exit(f"distill.py: vocabularies differ ({ds['vocab_size']} vs {dt['vocab_size']})")
    V = ds["vocab_size"]

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(1234)
    dev = "cuda"
    try:
        student, fwd = build(ds)
        teacher, _ = build(dt)
    except Exception as e:  # noqa: BLE001 - transformers present but unusable
        if args.model != "auto" or kind != "hf":
            raise
        print(f"distill.py: note: transformers' Llama failed ({type(e).__name__}: {e}); "
              f"using bench/torch/model.py", file=sys.stderr)
        kind = "tessera"
        torch.manual_seed(1234)
        student, fwd = build_tessera(ds)
        teacher, _ = build_tessera(dt)
    student = student.to(dev).train()
    teacher = teacher.to(dev, torch.bfloat16).eval().requires_grad_(False)
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=float(optim.get("lr", 3e-3)),
                            betas=(float(optim.get("beta1", 0.9)), float(optim.get("beta2", 0.95))),
                            weight_decay=float(optim.get("weight_decay", 0.1)), fused=True)
    clip = float(optim.get("grad_clip", 1.0))
    g = torch.Generator(device=dev).manual_seed(1234)
    batches = [torch.randint(0, V, (B, T + 1), device=dev, generator=g) for _ in range(4)]
    print(f"torch-distill model {kind}{'(sdpa)' if kind == 'hf' else ''} torch {torch.__version__} "
          f"gpu {torch.cuda.get_device_name().replace(' ', '_')} batch {B}x{T} "
          f"teacher {n_t / 1e6:.1f}M student {n_s / 1e6:.1f}M T {args.temperature:g} "
          f"steps {args.steps} warmup {args.warmup}", flush=True)

    def variant(mode):
        ce_loss, kd_loss = make_losses(V, args.temperature)
        s_mod, t_mod = student, teacher
        if mode == "compile":
            s_mod, t_mod = torch.compile(student), torch.compile(teacher)
            ce_loss, kd_loss = torch.compile(ce_loss), torch.compile(kd_loss)

        def update(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def plain_step(tokens, targets):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(s_mod, tokens)
            return update(ce_loss(logits, targets))

        def kd_step(tokens, targets):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                t_logits = fwd(t_mod, tokens)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                s_logits = fwd(s_mod, tokens)
            return update(kd_loss(s_logits, t_logits, targets))

        plain, warm_p, loss_p = time_steps(plain_step, batches, args.warmup, args.steps)
        kd, warm_k, loss_k = time_steps(kd_step, batches, args.warmup, args.steps)
        tag = f"torch-{mode}"
        print(f"{tag} plain_ms {plain * 1e3:.2f}\n{tag} kd_ms {kd * 1e3:.2f}\n"
              f"{tag} kd_over_plain {kd / plain:.2f}\n{tag} plain_tok_s {B * T / plain:.0f}\n"
              f"{tag} kd_tok_s {B * T / kd:.0f}", flush=True)
        print(f"distill.py: {mode}: warm-up {warm_p:.1f} s + {warm_k:.1f} s, last loss plain "
              f"{loss_p:.4f} kd {loss_k:.4f}, peak memory "
              f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB", file=sys.stderr, flush=True)

    variant("eager")
    if args.no_compile:
        print("torch-compile skipped: --no-compile", flush=True)
        return
    try:
        variant("compile")
    except Exception as e:  # noqa: BLE001 - eager stands; say why compile did not
        opt.zero_grad(set_to_none=True)
        msg = " ".join(str(e).split())[:200]
        print(f"torch-compile skipped: torch.compile failed ({type(e).__name__}: {msg}); "
              f"eager numbers only", flush=True)


if __name__ == "__main__":
    main()
