"""Training-step throughput, memory and FLOP utilisation of the MAE / ChannelMAE / ViT / ChannelViT models.

Every configuration (model x channels x image size x batch size x decoder variant) runs in a process of its own
(on CUDA a fresh interpreter, `--single_config`; on CPU a forked child), so that its peak memory is its own: on
CUDA `torch.cuda.max_memory_allocated` over the timed steps, on CPU the growth of `ru_maxrss` (a process-lifetime
maximum) over its value just before the first step. Before that baseline, one step of a tiny model of the same
family makes library code and workspaces resident. A step is forward + backward + AdamW; `--warmup` steps run
first (they include `torch.compile`'s compilation), then `--steps` steps are timed. FLOPs are counted on one
extra eager step with `torch.utils.flop_counter.FlopCounterMode` (model FLOPs: no recomputation from gradient
checkpointing, no optimizer); the same pass records which SDPA kernel the attention dispatched to. On CUDA one
more eager forward + backward runs under `torch.cuda.set_sync_debug_mode("warn")` to list host-device syncs.

Example (one H100/H200):
    python benchmarks/bench_train.py --models chamae_vit_base_patch16 mae_vit_base_patch16 \
        --channels 3 5 8 --input_size 224 --batch_size 64 --amp bf16 --compile --json bench.json
"""

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import timm.layers  # noqa: E402
import timm.optim  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models_chamae  # noqa: E402
import models_mae  # noqa: E402
import models_vit  # noqa: E402
from util.fast_paths import adamw_kwargs, enable_fast_paths  # noqa: E402
from util.flags import ArgumentParser  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
MB = 2**20
M_MMAP_THRESHOLD = -3
"""glibc mallopt parameter."""
MMAP_THRESHOLD_MEASURE = 64 * 2**10
MMAP_THRESHOLD_MAX = 32 * MB

PEAK_DENSE_BF16_TFLOPS = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
)
"""Dense (no sparsity) bf16/fp16 tensor-core peak by a substring of `torch.cuda.get_device_name()`, first match."""

SDPA_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}

SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
}
"""aten op that FlopCounterMode sees -> short kernel name; the math path shows up as plain bmm ops instead."""

OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads")
DECODER_OVERRIDES = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
CHANNEL_PREFIXES = ("chamae_", "channelmae_", "channelvit_")
VARIANT_KEYS = ("model", "input_size", "batch_size", "decoder", "decode_ratio", "sdpa_backend")
"""A fit over channel counts groups the results that agree on these keys."""


def get_args_parser():
    parser = ArgumentParser("ChannelMAE training-step benchmark", add_help=True)
    models = [*models_chamae.PRETRAIN_MODELS, *models_vit.FINETUNE_MODELS]
    parser.add_argument("--models", nargs="+", default=["chamae_vit_base_patch16"], choices=models, metavar="NAME")
    parser.add_argument("--channels", nargs="+", type=int, default=[3], help="C values (in_chans for mae_*/vit_*)")
    parser.add_argument("--input_size", nargs="+", type=int, default=[224])
    parser.add_argument("--batch_size", nargs="+", type=int, default=[16])
    parser.add_argument(
        "--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, else none"
    )
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model)")
    parser.add_argument(
        "--no_fast_paths", action="store_true", help="CUDA: no TF32, cudnn.benchmark, fused AdamW (util.fast_paths)"
    )
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument(
        "--decoder", nargs="+", choices=models_mae.DECODERS, default=["full"], help="pretraining decoders to compare"
    )
    parser.add_argument(
        "--decode_ratio", nargs="+", type=float, default=[1.0], help="cross decoder only; 'full' always runs at 1"
    )
    parser.add_argument("--num_classes", type=int, default=1000, help="classifier head of vit_*/channelvit_*")
    parser.add_argument(
        "--sdpa_backend",
        choices=["auto", *SDPA_BACKENDS],
        default="auto",
        help="restrict F.scaled_dot_product_attention to one kernel (math materialises the score matrix)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (include compilation)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write environment, results and fits to this file")
    g = parser.add_argument_group("size overrides (smoke runs)")
    for name in OVERRIDES + DECODER_OVERRIDES:
        g.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument(
        "--isolation",
        choices=["auto", "fork", "subprocess"],
        default="auto",
        help="how each config gets its own process: auto = fork on CPU (Linux), a new interpreter on CUDA",
    )
    parser.add_argument("--single_config", default=None, help=argparse.SUPPRESS)
    return parser


def is_pretrain_model(name):
    return name in models_chamae.PRETRAIN_MODELS


def expand_configs(args):
    """The cross product of the list options, one dict per process.

    Classifiers ignore the decoder options, and the full decoder ignores decode_ratio, so those variants are
    not repeated.
    """
    amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    common = dict(
        amp=amp,
        compile=args.compile,
        fast_paths=not args.no_fast_paths,
        grad_checkpointing=args.grad_checkpointing,
        mask_ratio=args.mask_ratio,
        num_classes=args.num_classes,
        sdpa_backend=args.sdpa_backend,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        peak_tflops=args.peak_tflops,
        seed=args.seed,
        overrides={k: getattr(args, k) for k in OVERRIDES + DECODER_OVERRIDES if getattr(args, k) is not None},
    )
    decoders = [("full", 1.0)] if "full" in args.decoder else []
    decoders += [("cross", r) for r in args.decode_ratio] if "cross" in args.decoder else []
    configs = []
    for model, size, batch, channels in itertools.product(args.models, args.input_size, args.batch_size, args.channels):
        for decoder, ratio in decoders if is_pretrain_model(model) else [(None, None)]:
            configs.append(
                dict(
                    model=model,
                    channels=channels,
                    input_size=size,
                    batch_size=batch,
                    decoder=decoder,
                    decode_ratio=ratio,
                    **common,
                )
            )
    return configs


def peak_rss_bytes():
    """Largest resident set of this process so far (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def set_mmap_threshold(nbytes):
    """glibc: serve allocations of at least `nbytes` by mmap, returned to the OS on free; False elsewhere.

    Setting the threshold also stops glibc from raising it dynamically (up to 32 MiB) after the first large free,
    which would otherwise keep freed activations in the heap and inflate the resident set.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))


def device_peak_tflops(device, override):
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_DENSE_BF16_TFLOPS if key in name), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_model(cfg):
    """The model of a config; returns (model, pretrain, channel_model)."""
    name = cfg["model"]
    overrides = dict(cfg["overrides"])
    kwargs = dict(img_size=cfg["input_size"], in_chans=cfg["channels"])
    pretrain = is_pretrain_model(name)
    if pretrain:
        kwargs.update(decoder=cfg["decoder"], decode_ratio=cfg["decode_ratio"], **overrides)
        model = models_chamae.create_model(name, **kwargs)
    else:
        kwargs.update({k: v for k, v in overrides.items() if k in OVERRIDES}, num_classes=cfg["num_classes"])
        model = models_vit.create_model(name, **kwargs)
    return model, pretrain, name.startswith(CHANNEL_PREFIXES)


def attention_modules(model):
    """(fused, total) over timm Attention modules (their `fused_attn` flag) and the SDPA-only CrossAttention."""
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    flags += [True for m in model.modules() if isinstance(m, models_mae.CrossAttention)]
    return sum(map(bool, flags)), len(flags)


def sdpa_kernel_names(flop_counts):
    """Short names of the SDPA kernels seen by FlopCounterMode; 'math' when attention ran as plain matmuls."""
    ops = {str(op).removeprefix("aten.").split(".")[0] for op in flop_counts.get("Global", {})}
    names = sorted({short for op, short in SDPA_KERNELS.items() if op in ops})
    return "+".join(names) or "math"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_host_syncs(device, forward_backward):
    """CUDA only: the synchronizing operations of one forward + backward, as 'file:line' of the Python caller."""
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward_backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


class TrainingStep:
    """One config's model, random inputs (N, C, H, W), AdamW and AMP; `step()` = forward + backward + AdamW.

    AdamW uses MAE's betas (0.9, 0.95) and weight decay 0.05, none on norms, biases and embeddings.
    """

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.model, self.pretrain, channel_model = build_model(cfg)
        self.model.to(device).train()
        N, C, H = cfg["batch_size"], cfg["channels"], cfg["input_size"]
        L = self.model.patch_embed.num_patches
        self.tokens = C * L if channel_model else L
        self.imgs = torch.randn(N, C, H, H, device=device)
        self.labels = torch.randint(0, cfg["num_classes"], (N,), device=device)
        self.channel_ids = torch.arange(C, device=device) if channel_model else None
        no_decay = () if self.pretrain else self.model.no_weight_decay()  # the rules of main_pretrain / main_finetune
        groups = timm.optim.param_groups_weight_decay(self.model, 0.05, no_decay)
        enable_fast_paths(device, cfg["fast_paths"])
        fused = adamw_kwargs(device, cfg["fast_paths"])
        self.optimizer = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), **fused)
        self.amp_dtype = torch.float16 if cfg["amp"] == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
        if cfg["grad_checkpointing"]:
            self.model.set_grad_checkpointing(True)
        self.step_model = torch.compile(self.model) if cfg["compile"] else self.model

    def forward_backward(self, module):
        """Loss of one batch through `module` (the model, or its compiled wrapper), then backward."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg["amp"] != "none"):
            if self.pretrain:
                loss = module(self.imgs, mask_ratio=self.cfg["mask_ratio"], channel_ids=self.channel_ids)[0]
            else:
                loss = F.cross_entropy(module(self.imgs, channel_ids=self.channel_ids), self.labels)
        self.scaler.scale(loss).backward()
        return loss

    def step(self):
        loss = self.forward_backward(self.step_model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def optimizer_state_bytes(self):
        states = self.optimizer.state.values()
        return sum(t.numel() * t.element_size() for s in states for t in s.values() if torch.is_tensor(t) and t.dim())


def prime(cfg, device):
    """One eager step of a tiny model of the same family before the memory baseline.

    Code pages, kernel JIT buffers and library workspaces that any first step touches are then already resident
    (CPU) or allocated (CUDA), and do not count as the measured model's memory.
    """
    overrides = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    overrides.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    tiny = dict(cfg, input_size=16, batch_size=2, num_classes=8, compile=False, overrides=overrides)
    TrainingStep(tiny, device).step()


def run_config(cfg):
    """Build, warm up, time and measure one configuration; returns the result dict (cfg plus measurements).

    CUDA: peak memory over the timed steps. CPU: peak RSS over the warm-up steps (at least 2, so that one of them
    holds AdamW state), run with glibc's mmap threshold pinned low so that freed tensors leave the resident set;
    the timed steps then run with the threshold at glibc's usual 32 MiB ceiling.
    """
    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    warmup = cfg["warmup"] if cuda else max(cfg["warmup"], 2)
    exact_rss = not cuda and set_mmap_threshold(MMAP_THRESHOLD_MEASURE)
    backend = SDPA_BACKENDS.get(cfg["sdpa_backend"])
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        prime(cfg, device)
        bench = TrainingStep(cfg, device)
        sync(device)
        baseline = torch.cuda.memory_allocated(device) if cuda else peak_rss_bytes()
        first_step_s = None
        start = time.perf_counter()
        for i in range(warmup):
            bench.step()
            if i == 0:
                sync(device)
                first_step_s = time.perf_counter() - start
        sync(device)
        warmup_s = time.perf_counter() - start
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            peak_delta = peak = peak_rss_bytes() - baseline
            if exact_rss:
                set_mmap_threshold(MMAP_THRESHOLD_MAX)
        step_times = []
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(cfg["steps"]):
            loss = bench.step()
            if not cuda:
                step_times.append(time.perf_counter() - start - sum(step_times))
        sync(device)
        elapsed, cpu_time = time.perf_counter() - start, time.process_time() - start_cpu
        loss = float(loss.detach())
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            peak_delta = peak - baseline
        state = bench.optimizer_state_bytes()

        model = bench.model
        model.set_grad_checkpointing(False)
        counter = FlopCounterMode(display=False)
        with counter:
            bench.forward_backward(model)
        model.zero_grad(set_to_none=True)
        host_syncs = None
        if cuda:
            host_syncs = count_host_syncs(device, lambda: bench.forward_backward(model))
            model.zero_grad(set_to_none=True)

    N, T = cfg["batch_size"], bench.tokens
    flops = counter.get_total_flops()
    images_per_s = N * cfg["steps"] / elapsed
    tflops = flops * cfg["steps"] / elapsed / 1e12
    peak_tflops = device_peak_tflops(device, cfg["peak_tflops"])
    fused, attn_total = attention_modules(model)
    if bench.pretrain:
        visible = int(T * (1 - cfg["mask_ratio"]))
        decoder_tokens = 1 + T if cfg["decoder"] == "full" else max(1, int((T - visible) * cfg["decode_ratio"]))
        encoder_tokens = 1 + visible
    else:
        encoder_tokens, decoder_tokens = 1 + T, None
    return dict(
        cfg,
        task="pretrain" if bench.pretrain else "finetune",
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        tokens=T,
        encoder_tokens=encoder_tokens,
        decoder_tokens=decoder_tokens,
        step_ms=1e3 * elapsed / cfg["steps"],
        step_ms_min=1e3 * min(step_times) if step_times else None,
        cpu_ms_per_step=1e3 * cpu_time / cfg["steps"],
        warmup_steps=warmup,
        first_step_s=first_step_s,
        warmup_s=warmup_s,
        images_per_s=images_per_s,
        tokens_per_s=images_per_s * T,
        peak_mem_mb=peak / MB,
        baseline_mem_mb=baseline / MB,
        optimizer_state_mb=state / MB,
        act_mem_mb=(peak_delta - state) / MB,
        mem_kind="cuda_max_allocated" if cuda else "cpu_peak_rss_delta" + ("" if exact_rss else "_malloc_default"),
        gflops_per_step=flops / 1e9,
        gflops_per_image=flops / N / 1e9,
        tflops=tflops,
        peak_tflops=peak_tflops,
        mfu=tflops / peak_tflops if peak_tflops else None,
        sdpa_kernel=sdpa_kernel_names(counter.get_flop_counts()),
        fused_attn=f"{fused}/{attn_total}",
        host_syncs=host_syncs,
        loss=loss,
        device_name=device_name(device),
        load_avg=os.getloadavg()[0],
    )


def run_config_safely(cfg):
    """run_config, with a failure (out of memory, bad option) turned into an error row."""
    try:
        return run_config(cfg)
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as e:
        return dict(cfg, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def fork_worker(cfg, conn):
    conn.send(run_config_safely(cfg))
    conn.close()


def run_in_fork(cfg):
    """Run one config in a forked child of this (torch-imported, never-computing) process.

    A forked child starts its ru_maxrss at its own resident set, so its peak is its own, without paying
    another interpreter start and `import torch` per config.
    """
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=fork_worker, args=(cfg, sender))
    proc.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    proc.join()
    return result or dict(cfg, error=f"benchmark process exited with code {proc.exitcode}")


def run_in_subprocess(cfg):
    """Run one config in a fresh interpreter (CUDA cannot be used in a forked child once initialised)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single_config", json.dumps(cfg)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return dict(cfg, error=f"benchmark subprocess exited with code {proc.returncode}")


def single_config_main(cfg_json):
    print(RESULT_PREFIX + json.dumps(run_config_safely(json.loads(cfg_json))), flush=True)


def loglog_slope(xs, ys):
    """Least-squares slope k of log y = k log x + b."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def channel_fits(results):
    """Per variant measured at >= 2 token counts: how activation memory and step time grow with the tokens.

    mem_exponent fits act MB ~ tokens^k; extra_mem_exponent fits (act MB - its value at the fewest tokens) against
    (tokens - fewest tokens), which drops the part that does not depend on the tokens (gradients, workspaces).
    """
    groups = {}
    for r in results:
        if "error" not in r:
            groups.setdefault(tuple(r[k] for k in VARIANT_KEYS), []).append(r)
    fits = []
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: r["tokens"])
        if len({r["tokens"] for r in rows}) < 2 or min(r["act_mem_mb"] for r in rows) <= 0:
            continue
        tokens = [r["tokens"] for r in rows]
        mem = [r["act_mem_mb"] for r in rows]
        first, last = rows[0], rows[-1]
        marginal = [1e3 * (m1 - m0) / (t1 - t0) for m0, m1, t0, t1 in zip(mem, mem[1:], tokens, tokens[1:])]
        extra = [(t - tokens[0], m - mem[0]) for t, m in zip(tokens[1:], mem[1:])]
        usable = len(extra) >= 2 and all(dt > 0 and dm > 0 for dt, dm in extra)
        fits.append(
            dict(
                {k: first[k] for k in VARIANT_KEYS},
                channels=[r["channels"] for r in rows],
                tokens=tokens,
                mem_exponent=loglog_slope(tokens, mem),
                extra_mem_exponent=loglog_slope(*zip(*extra)) if usable else None,
                time_exponent=loglog_slope(tokens, [r["step_ms"] for r in rows]),
                mem_growth_per_token_growth=(mem[-1] / mem[0]) / (tokens[-1] / tokens[0]),
                mb_per_1k_tokens=marginal,
                step_ms_growth=last["step_ms"] / first["step_ms"],
            )
        )
    return fits


def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def decoder_label(r):
    if r["decoder"] is None:
        return "-"
    return r["decoder"] if r["decoder"] == "full" else f"cross {r['decode_ratio']:g}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(results):
    header = ["model", "C", "px", "batch", "tokens", "enc/dec tok", "decoder", "img/s", "tok/s", "step ms"]
    header += ["peak MB", "act MB", "GFLOP/img", "TFLOP/s", "MFU", "attn"]
    rows = []
    for r in results:
        head = [r["model"], str(r["channels"]), str(r["input_size"]), str(r["batch_size"])]
        if "error" in r:
            rows.append(head + ["-", "-", decoder_label(r), f"error: {r['error']}"] + ["-"] * 8)
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        rows.append(
            head
            + [
                str(r["tokens"]),
                f"{r['encoder_tokens']}/{fmt(r['decoder_tokens'])}",
                decoder_label(r),
                fmt(r["images_per_s"], 2),
                fmt(r["tokens_per_s"], 0),
                fmt(r["step_ms"], 0),
                fmt(r["peak_mem_mb"], 0),
                fmt(r["act_mem_mb"], 0),
                f"{r['gflops_per_image']:.3g}",
                f"{r['tflops']:.3g}",
                mfu,
                r["sdpa_kernel"],
            ]
        )
    return markdown_table(header, rows)


def fits_table(fits):
    header = ["model", "px", "batch", "decoder", "attn", "C", "tokens", "mem exponent", "extra mem exponent"]
    header += ["mem growth / token growth", "MB per 1k extra tokens", "time exponent"]
    rows = [
        [
            f["model"],
            str(f["input_size"]),
            str(f["batch_size"]),
            decoder_label(f),
            f["sdpa_backend"],
            ",".join(map(str, f["channels"])),
            f"{f['tokens'][0]}-{f['tokens'][-1]}",
            f"{f['mem_exponent']:.2f}",
            fmt(f["extra_mem_exponent"], 2),
            f"{f['mem_growth_per_token_growth']:.2f}",
            ", ".join(f"{m:.0f}" for m in f["mb_per_1k_tokens"]),
            f"{f['time_exponent']:.2f}",
        ]
        for f in fits
    ]
    return markdown_table(header, rows)


def environment(args, results):
    ok = [r for r in results if "error" not in r]
    return dict(
        torch=torch.__version__,
        timm=timm.__version__,
        device=args.device,
        device_name=ok[0]["device_name"] if ok else None,
        timm_use_fused_attn=timm.layers.use_fused_attn(),
        cpu_count=os.cpu_count(),
        command=" ".join(sys.argv),
    )


def print_report(args, env, results, fits):
    cfg = results[0]
    memory = (
        "torch.cuda.max_memory_allocated over the timed steps"
        if args.device.startswith("cuda")
        else "growth of peak RSS (ru_maxrss) over the warm-up steps (glibc mmap threshold 64 KiB), a process per config"
    )
    kernels = sorted({r["sdpa_kernel"] for r in results if "error" not in r})
    fused = sorted({r["fused_attn"] for r in results if "error" not in r})
    print(f"# torch {env['torch']}, timm {env['timm']}, {env['device_name']}")
    print(
        f"# AMP {cfg['amp']}, compile {'on' if cfg['compile'] else 'off'}, grad checkpointing "
        f"{'on' if cfg['grad_checkpointing'] else 'off'}, mask ratio {cfg['mask_ratio']}, "
        f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up, AdamW, fast paths "
        f"{'on' if cfg['fast_paths'] and args.device.startswith('cuda') else 'off'} "
        "(TF32, cudnn.benchmark, fused AdamW; CUDA only)"
    )
    print(
        f"# attention: timm use_fused_attn()={env['timm_use_fused_attn']}, fused SDPA modules {', '.join(fused)}, "
        f"SDPA backend {args.sdpa_backend}, kernel {', '.join(kernels)}"
    )
    print(f"# peak MB: {memory}; act MB: peak above weights + inputs + AdamW state (= gradients + activations)")
    print(results_table(results))
    if fits:
        print(
            "\n# growth with C (log-log least squares over tokens = C*L): act MB ~ tokens^k, step time ~ tokens^k;"
            " extra mem exponent: the same fit of the growth over the smallest C (drops the constant part);"
            " MB per 1k extra tokens between consecutive C (constant = linear, rising = quadratic)"
        )
        print(fits_table(fits))
    syncs = {s for r in results for s in r.get("host_syncs") or []}
    if syncs:
        print(f"\n# host-device syncs in forward+backward: {', '.join(sorted(syncs))}")


def main(args):
    configs = expand_configs(args)
    isolation = args.isolation
    if isolation == "auto":
        cpu_only = torch.device(args.device).type == "cpu"
        isolation = "fork" if cpu_only and "fork" in multiprocessing.get_all_start_methods() else "subprocess"
    results = []
    for i, cfg in enumerate(configs, 1):
        print(
            f"[{i}/{len(configs)}] {cfg['model']} C={cfg['channels']} {cfg['input_size']}px "
            f"batch {cfg['batch_size']} {decoder_label(cfg)}",
            file=sys.stderr,
            flush=True,
        )
        results.append(run_in_fork(cfg) if isolation == "fork" else run_in_subprocess(cfg))
    fits = channel_fits(results)
    env = environment(args, results)
    print_report(args, env, results, fits)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(environment=env, results=results, fits=fits), indent=1))
    return results


if __name__ == "__main__":
    parser = get_args_parser()
    cli_args = parser.parse_args()
    if cli_args.steps < 1 or cli_args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if cli_args.single_config is not None:
        single_config_main(cli_args.single_config)
    else:
        main(cli_args)
