"""CUDA device placement without a GPU: every model, mask, cache, adapter and optimiser path run on
tensors that claim to live on "cuda", through torch's FakeTensorMode.

FakeTensorMode (torch._subclasses.fake_tensor) runs the real operators on shapes only, propagates
devices, and raises FakeTensorDeviceMismatchError where a CPU tensor meets a CUDA one -- the bug of
a mask, position ids, a KV cache or a LoRA weight created without `device=`.  No value is ever
computed, so nothing here reads a tensor back to the host; where the code under test does (mask
validation and the stop checks of `generate`) the host reads of the same call on the CPU are
recorded and replayed (`host_reads` / `Replay`, tests/fake_cuda.py), and the engine's per-step
function must run with none at all.

What torch 2.13's CPU build allows, and how each limit is handled:
* Python indexing of a CUDA tensor needs a CUDA device guard, which a CPU build lacks (torch's own
  `_ensureCUDADeviceGuardSet` only patches CUDA builds without devices): `cuda_device_guard`
  registers the CPU's no-op guard for CUDA while a test runs, and removes it afterwards.
* The autograd engine refuses a backward pass on CUDA tensors without an accelerator ("Cannot access
  accelerator device when none is available"): backward passes run on the fake "meta" device, the
  same kind of check (any CPU tensor meeting a meta one raises); forwards run on fake "cuda", so the
  CUDA-only branches (attention paths, autocast, generation settings per device) are the ones taken.
* `.to("cuda")` without an index asks the driver for the current device: models move to cuda:0.
* Modules built inside FakeTensorMode cannot be moved (their parameters are weakly referenced by
  the fake-tensor memo, and `swap_tensors` refuses them): models and adapters are built for real on
  the CPU, then moved onto the fake device, as the scripts do with `model.to(device)`.
* No CUDA `torch.Generator` can be made, `pin_memory` has no fake kernel, a CUDA autocast is
  disabled without CUDA, the sparse layout's construction is data-dependent (boolean indexing,
  bincount: shapes depend on values), and peft's merge reads values; see each test.
* torch.compile does not run on fake CUDA tensors: inductor allocates real ones ("Could not run
  'aten::empty.memory_format' with arguments from the 'CUDA' backend"), and the compiled
  FlexAttention kernel fails in lowering ("Torch not compiled with CUDA enabled"), so BlockMasks are
  built here but FlexAttention, the compiled decode step and `--compile` run in bench.gpu_check only.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fake_cuda import (CPU, CUDA, META, Replay, batch, devices, host_reads, placed, small_config, tensors_of,
                       unfaked)
from fake_cuda import fake  # noqa: F401  (the fixture)
from models import generation
from models.gpt2 import GPT2LMHeadModel, GPT2Model
from models.losses import next_token_loss
from modules.attention import build_attention_mask
from modules.attention_patterns import PATTERNS


# ---- the model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["right", "left"])
def test_forward_on_cuda_and_backward_on_meta_with_padded_masks(fake, padding):
    lm = placed(lambda: GPT2LMHeadModel(small_config()).train(), CUDA)
    backbone = placed(lambda: GPT2Model(small_config()).train(), CUDA)
    ids, mask = batch(CUDA, padding)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if padding == "left" else None
    out = backbone(ids, mask, positions)
    logits = lm(ids, mask, positions)
    assert devices(out) == {CUDA} and logits.device == CUDA and logits.shape == (2, 8, 96)
    assert backbone.hidden_state_to_token(out["last_token"]).device == CUDA

    lm = placed(lambda: GPT2LMHeadModel(small_config()).train(), META)
    ids, mask = batch(META, padding)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if padding == "left" else None
    next_token_loss(lm(ids, mask, positions), ids, mask).backward()
    assert {p.grad.device for p in lm.parameters()} == {META}


# ---- sparse attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("global_tokens", [0, 2])
def test_every_pattern_mask_on_cuda(fake, global_tokens):
    """The boolean SDPA mask and the FlexAttention BlockMask of every pattern, with padding and a
    cache offset (decode) and without (training)."""
    S = 12
    mask = torch.ones(2, S, dtype=torch.long, device=CUDA)
    mask[1, :3] = 0
    for pattern in PATTERNS:
        for key_mask, T, start in ((mask, 4, 8), (mask, S, 0), (None, S, 0), (mask[:, :9], 1, 8)):
            dense_mask, _ = build_attention_mask(key_mask, T, start, CUDA, pattern=pattern, window=3,
                                                 global_tokens=global_tokens)
            assert dense_mask is None or dense_mask.device == CUDA
            block_mask, _ = build_attention_mask(key_mask, T, start, CUDA, pattern=pattern, window=3, path="flex",
                                                 global_tokens=global_tokens)
            assert devices(list(block_mask.as_tuple())) == {CUDA}, (pattern, T, start)


def cpu_layout_on(key_mask_cpu, monkeypatch):
    """The sparse layout is data-dependent (boolean indexing, bincount, int(counts.max()): its shapes
    depend on the mask's values), so FakeTensorMode cannot build it: build it for real from the
    known CPU mask and move it to the device asked for, as a stand-in for `build_sparse_layout`."""
    import modules.attention as attention
    from modules.sparse_attention import build_sparse_layout

    positions_of = attention.positions_from_mask

    def on_device(pattern, window, cache_start, T, key_valid, positions, dev, global_tokens=0, block_size=None):
        with unfaked():
            valid = None if key_valid is None else key_mask_cpu[:, :cache_start + T].bool()
            layout = build_sparse_layout(pattern, window, cache_start, T, valid,
                                         None if positions is None else positions_of(valid), CPU,
                                         global_tokens, block_size)
        return dataclasses.replace(layout, **{f.name: getattr(layout, f.name).to(dev) for f in dataclasses.fields(layout)
                                              if torch.is_tensor(getattr(layout, f.name))})

    monkeypatch.setattr(attention, "build_sparse_layout", on_device)


@pytest.mark.parametrize("pattern", ["logsparse", "local", "hybrid"])
def test_sparse_execution_path_forward_on_cuda_backward_on_meta(fake, pattern, monkeypatch):
    cfg = small_config(attention=pattern, attention_window=3, attention_global_tokens=1, attention_backend="sparse")
    with unfaked():
        _, mask_cpu = batch(CPU)  # the mask batch() makes on every device
    cpu_layout_on(mask_cpu, monkeypatch)
    model = placed(lambda: GPT2Model(cfg).train(), CUDA)
    ids, mask = batch(CUDA)
    assert model(ids, mask)["last_hidden_state"].device == CUDA
    model = placed(lambda: GPT2Model(cfg).train(), META)
    ids, mask = batch(META)
    model(ids, mask)["last_token"].sum().backward()
    assert {p.grad.device for p in model.parameters() if p.grad is not None} == {META}


# ---- generation ------------------------------------------------------------------------------------
def fresh_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("decoding", [dict(), dict(do_sample=True, top_p=0.9, top_k=20, temperature=0.8),
                                      dict(num_beams=3, eos_token_id=7),
                                      dict(repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=7)],
                         ids=["greedy", "top_p", "beam", "penalties_eos"])
def test_generate_on_cuda(fake, decoding, monkeypatch):
    """generate() on a left-padded batch: prefill into the KV cache, then decode steps.  The host
    reads (mask validation, the stop check) answer as on the CPU; with a stop rule the CPU run reads
    as often as a CUDA run would (STOP_CHECK_EVERY), and a longer generation may not read more per
    token.  Sampling runs without a generator: no CUDA torch.Generator can be made without a GPU."""
    monkeypatch.setitem(generation.STOP_CHECK_EVERY, "cpu", generation.STOP_CHECK_EVERY["cuda"])
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    kwargs = dict(max_new_tokens=10, **decoding)

    def on_cpu(**more):
        ids, mask = generation.left_pad(prompts, pad_id=95)
        return fresh_lm().generate(ids, mask, **{**kwargs, **more})

    with unfaked():
        reads = host_reads(on_cpu)
        expected_shape = on_cpu().shape
        longer = host_reads(lambda: on_cpu(max_new_tokens=18))
    # No host read per token: 8 more steps add at most one stop check, one read (beam search too).
    assert len(longer) - len(reads) <= (1 if "eos_token_id" in decoding else 0)
    model = placed(fresh_lm, CUDA)
    ids, mask = generation.left_pad(prompts, pad_id=95)
    with Replay(reads) as replay:
        out = model.generate(ids.to(CUDA), mask.to(CUDA), **kwargs)
    assert out.device == CUDA and out.shape == expected_shape and not replay.values
    assert all(layer.self_attention.kv_cache is None for layer in model.gpt.gpt_layers)  # cleared afterwards


@pytest.mark.parametrize("decoding", [dict(), dict(do_sample=True, top_p=0.9), dict(eos_token_id=7)],
                         ids=["greedy", "sampling", "eos"])
def test_speculative_generate_on_cuda(fake, decoding):
    """Speculative decoding with target and draft on the device: drafting, the batched verify
    forward, rejection sampling and cache compaction, the host reads answering as on the CPU."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    kwargs = dict(max_new_tokens=12, num_assistant_tokens=3, **decoding)

    def draft():
        torch.manual_seed(1)
        return GPT2LMHeadModel(small_config(num_hidden_layers=1, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0))

    def on_cpu(**more):
        ids, mask = generation.left_pad(prompts, pad_id=95)
        return fresh_lm().generate(ids, mask, assistant_model=draft(), **{**kwargs, **more})

    with unfaked():
        reads = host_reads(on_cpu)
        expected_shape = on_cpu().shape
        stats = {}
        longer = host_reads(lambda: on_cpu(max_new_tokens=30, stats=stats))
    # One host read per verify round (and one per cache compaction) beyond a fixed few.
    assert len(longer) <= stats["target_forwards"] + stats["compactions"] + 6
    model, assistant = placed(fresh_lm, CUDA), placed(draft, CUDA)
    ids, mask = generation.left_pad(prompts, pad_id=95)
    with Replay(reads) as replay:
        out = model.generate(ids.to(CUDA), mask.to(CUDA), assistant_model=assistant, **kwargs)
    assert out.device == CUDA and out.shape == expected_shape and not replay.values
    assert all(layer.self_attention.kv_cache is None for m in (model, assistant) for layer in m.gpt.gpt_layers)


def test_kv_cache_prefill_and_decode_steps_on_cuda(fake):
    """The model side of a generation by hand: cache set-up, a padded prefill, three one-token steps."""
    model = placed(lambda: fresh_lm().eval(), CUDA)
    ids, mask = generation.left_pad([[5, 6, 7, 8], [9, 10]], pad_id=95)
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    model.setup_kv_cache(2, 8)
    assert devices([layer.self_attention.kv_cache.k for layer in model.gpt.gpt_layers]) == {CUDA}
    full = torch.ones(2, 8, dtype=torch.long, device=CUDA)
    full[:, :4] = mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, mask, pos, cache_start=0)[:, -1]
        for t in range(3):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            logits = model(nxt, full[:, :5 + t], pos[:, -1:] + 1 + t, cache_start=4 + t)[:, -1]
    assert logits.device == CUDA and logits.shape == (2, 96)
    model.clear_kv_cache()


def test_decode_step_runs_without_a_host_sync(fake):
    """The generation engine's per-step body (`decode_step`: forward, logits processing, choice,
    stop bookkeeping) on CUDA with NO host-read replay: FakeTensorMode raises on any value read
    back to the host, so passing proves a step never synchronises."""
    from models.generation import sampling
    from models.generation.processors import LogitsSettings

    model = placed(fresh_lm, CUDA)
    ids, mask = generation.left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], pad_id=95)
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    B, P, n = 2, ids.size(1), 4
    eos = torch.tensor([7], device=CUDA)
    settings = LogitsSettings(repetition_penalty=1.2, eos_ids=eos, sample=True, temperature=0.8, top_k=20, top_p=0.9)
    rules = sampling.StopRules(pad=95, eos_ids=eos)
    tokens = torch.full((B, P + n), 95, dtype=torch.long, device=CUDA)
    tokens[:, :P] = ids
    valid = torch.ones((B, P + n), dtype=torch.bool, device=CUDA)
    valid[:, :P] = mask.bool()
    state = sampling.DecodeState(tokens, valid, torch.ones(B, dtype=torch.bool, device=CUDA),
                                 torch.full((B,), n, dtype=torch.long, device=CUDA),
                                 torch.zeros(B, dtype=torch.long, device=CUDA), P)
    decoder = sampling.Decoder(model, P, mask, B, n)
    try:
        logits = decoder.prefill(ids, mask)
        for t in range(n):
            sampling.decode_step(decoder, state, t, settings, rules, None, logits if t == 0 else None)
    finally:
        decoder.close()
    assert devices([state.tokens, state.unfinished, state.finished_at, state.newlines]) == {CUDA}


# ---- adapters and frozen models --------------------------------------------------------------------
def test_lora_model_on_cuda_and_meta(fake):
    from training.efficient import apply_lora, load_model_state, model_state

    def build():  # peft builds its adapters as modules: for real, then moved (see the module docstring)
        return apply_lora(GPT2LMHeadModel(small_config()).train(), r=4, alpha=8.0, targets="attn")

    with unfaked():
        checkpoint = model_state(build())  # an adapter checkpoint as read from disk: CPU tensors
    model = placed(build, CUDA)
    load_model_state(model, checkpoint)  # what resuming a LoRA run does
    assert {p.device for n, p in model.named_parameters() if "lora_" in n} == {CUDA}
    ids, mask = batch(CUDA)
    assert model(ids, mask).device == CUDA
    model = placed(build, META)
    ids, mask = batch(META)
    next_token_loss(model(ids, mask), ids, mask).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g.device == META for n, g in grads.items())


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # deepcopy asks; harmless here
def test_frozen_and_copied_models_on_cuda(fake):
    from training.efficient import freeze_parameters, frozen_copy

    model = placed(lambda: GPT2LMHeadModel(small_config()).train(), CUDA)
    frozen = freeze_parameters(model, "first-half")
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    teacher = frozen_copy(model)
    ids, mask = batch(CUDA)
    assert model(ids, mask).device == CUDA and teacher(ids, mask).device == CUDA
    assert devices(list(teacher.parameters())) == {CUDA}


# ---- optimisers ------------------------------------------------------------------------------------
def optimizer_names():
    from training.optimizers import OPTIMIZERS

    host_reads = pytest.mark.skip(reason="torch.optim.Adafactor reads norms and its step on the host by design "
                                         "(param.norm().item() in torch's own code): no fake-CUDA run; its state is "
                                         "torch's, placed like its parameters")
    return [pytest.param(n, marks=host_reads) if n == "adafactor" else n for n in sorted(OPTIMIZERS)]


@pytest.mark.parametrize("name", ["ours-foreach", "ours-loop", *optimizer_names()])
def test_optimizer_steps_on_cuda(fake, name):
    """Two steps of every optimiser on CUDA parameters (gradients set by hand: no backward on fake
    CUDA); every state tensor the optimiser creates must be on the parameters' device."""
    from optimizer import AdamW
    from training.config import TrainConfig
    from training.optimizers import build_optimizer

    model = placed(lambda: GPT2LMHeadModel(small_config()), CUDA)
    if name.startswith("ours"):
        opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=name == "ours-foreach")
    else:
        opt = build_optimizer(model, TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.01, precondition_frequency=1,
                                                 max_precond_dim=64))
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = [t for s in opt.state.values() for t in tensors_of(s)]
    assert state and {t.device for t in state if t.dim() > 0} == {CUDA}
    assert devices(list(model.parameters())) == {CUDA}


# ---- the trainer -----------------------------------------------------------------------------------
def test_trainer_batch_transfer_to_cuda(fake, monkeypatch):
    """`Trainer._to_device` pins host memory and copies without blocking on CUDA.  `pin_memory` has
    no fake kernel (NYI aten._pin_memory), so it is recorded and returns the tensor itself."""
    from training.trainer import Trainer

    pinned = []

    def pin_memory(self):
        pinned.append(self.device)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    trainer = Trainer.__new__(Trainer)  # only the device matters for the transfer
    trainer.device = CUDA
    ids, mask = batch(CPU)
    moved = {k: trainer._to_device(v) for k, v in {"input_ids": ids, "attention_mask": mask, "n": 3}.items()}
    assert moved["input_ids"].device == CUDA and moved["attention_mask"].device == CUDA and moved["n"] == 3
    assert pinned == [CPU, CPU]


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_training_step_bf16_autocast(fake):
    """One training step of the trainer's parts: TaskStep(model, loss) under the trainer's bf16
    autocast, backward, clipping, the optimiser and the schedule.  Without CUDA, torch disables a CUDA
    autocast ("CUDA is not available ... Disabling autocast"): fake CUDA matmuls stay fp32, so the
    dtypes are checked for real under the CPU's bf16 autocast; placement on fake CUDA (the forward,
    inside the CUDA autocast context) and on meta (the backward and the optimiser step)."""
    from training.build import autocast
    from training.config import TrainConfig
    from training.optimizers import build_optimizer, lr_schedule
    from training.task import split_loss
    from training.trainer import TaskStep

    def loss(model, b):
        logits = model(b["input_ids"], b["attention_mask"])
        return next_token_loss(logits, b["input_ids"], b["attention_mask"]), b["attention_mask"].sum(), {"logits": logits}

    def step(device, precision, backward):
        model = placed(lambda: GPT2LMHeadModel(small_config()).train(), device)
        ids, mask = batch(device)
        with autocast(device, precision):
            value, tokens, logs = split_loss(TaskStep(model, loss)({"input_ids": ids, "attention_mask": mask}))
        assert value.device == device and value.dtype == torch.float32 and tokens.device == device
        if backward:
            opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule("linear", 1, 10))
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            assert devices(list(opt.state.values())) == {device}
            assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
        return value, logs

    step(CUDA, "bf16", backward=False)
    step(META, "fp32", backward=True)
    with unfaked():
        value, logs = step(CPU, "bf16", backward=True)
        assert logs["logits"].dtype == torch.bfloat16 and torch.isfinite(value)


# ---- task heads -----------------------------------------------------------------------------------
def test_classifier_head_and_cloze_logits_on_cuda(fake):
    from tasks.paraphrase import two_way_logits
    from tasks.sentiment import GPT2SentimentClassifier

    classifier = placed(lambda: GPT2SentimentClassifier(GPT2Model(small_config()), num_labels=5,
                                                        hidden_dropout_prob=0.1).train(), CUDA)
    # The cloze answer tokens (" no", " yes") are real GPT-2 ids: the full vocabulary.
    lm = placed(lambda: GPT2LMHeadModel(small_config(vocab_size=50257, pad_token_id=50256, eos_token_id=50256)), CUDA)
    ids, mask = batch(CUDA, "right")
    logits = classifier(ids, mask)
    assert logits.device == CUDA and logits.shape == (2, 5)
    cloze = two_way_logits(lm, ids, mask)
    assert cloze.device == CUDA and cloze.shape == (2, 2)


def test_a_cpu_tensor_meeting_a_cuda_one_is_caught(fake):
    """The mechanism itself: without this error every test above would pass on any placement."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    x = torch.zeros(3, device=CUDA)
    with pytest.raises(FakeTensorDeviceMismatchError):
        x + torch.arange(3)
    with pytest.raises(FakeTensorDeviceMismatchError):
        torch.zeros(3, device=META) + torch.arange(3)
    assert x[1:].device == CUDA  # indexing works (the CUDA device guard is registered)
