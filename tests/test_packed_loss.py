"""The packed objectives equal the per-sample ones, however the samples are packed."""

import pytest
import torch
from PIL import Image

from conftest import GEN_VARIANTS, randomize_, tiny_variant
from data.packing import collate_packed
from data.sequences import GEN_TIME, encode_gen, encode_text, encode_und
from models.packed import packed_losses


def _samples(proc, cfg):
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    und = {"conversation": [{"user": "<image_placeholder>\nWhat colour?", "assistant": "red"},
                            {"user": "And the shape?", "assistant": "a circle"}]}
    gen = lambda prompt, drop: encode_gen(proc, {"prompt": prompt}, img, num_gen_tokens=cfg.num_gen_tokens,
                                          image_size=32, template="chat", drop_prompt=drop)
    return [encode_und(proc, und, img), gen("a red circle", False), encode_text(proc, "Purple is a mix."),
            gen("two blue squares", True)]


def _inputs(model, samples, rows, max_len, pad_id):
    batch = collate_packed([[samples[i] for i in r] for r in rows], max_len=max_len, pad_id=pad_id)
    full_image = model.config.gen.full_image_attention
    return dict(input_ids=batch.input_ids, position_ids=batch.position_ids,
                attention_mask=batch.attention_mask(full_image=full_image), roles=batch.roles, labels=batch.labels,
                und_pixels=batch.und_pixels), batch


@pytest.mark.parametrize("variant", list(GEN_VARIANTS))
def test_packed_losses_equal_per_sample_losses(variant):
    pipe = tiny_variant(variant)
    model, proc = pipe.model, pipe.processor
    randomize_(model)
    cfg = model.config
    samples = _samples(proc, cfg)
    gens = [s for s in samples if s.kind == "gen"]
    latents = model.encode_images(torch.stack([s.image for s in gens]))
    repa_t = model.repa_target(torch.stack([s.image for s in gens]))
    t = torch.tensor([0.3, 0.8])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))

    # references: each sample alone through the unpacked API
    ar_sum = ar_n = 0.0
    for s in (samples[0], samples[2]):
        batch = proc.pad([s.input_ids], [s.labels])
        image_mask = torch.tensor([[r == 1 for r in s.roles]])
        pixels = s.image[None] if s.image is not None else torch.zeros(0, 3, 32, 32)
        if s.image is None:
            embeds_out = model.llm.model(input_ids=batch.input_ids).last_hidden_state
            ar, n = model.ar_loss(embeds_out, batch.labels)
        else:
            out = model.understanding_loss(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           labels=batch.labels, image_mask=image_mask, pixel_values=pixels)
            ar, n = out["ar"], out["ar_tokens"]
        ar_sum += float(ar.detach()) * float(n)
        ar_n += float(n)
    rf_ref, repa_ref = [], []
    for k, s in enumerate(gens):
        p = s.roles.index(GEN_TIME)
        ids = torch.tensor([s.input_ids[:p]])
        mask = torch.tensor([s.visible[:p]], dtype=torch.long)
        out = model.generation_loss(prompt_ids=ids, prompt_mask=mask, prompt_lengths=torch.tensor([p]),
                                    latents=latents[k:k + 1], repa_target=repa_t[k:k + 1],
                                    t=t[k:k + 1], noise=noise[k:k + 1])
        rf_ref.append(float(out["rf"]))
        repa_ref.append(float(out["repa"]))

    for rows, max_len in (([[0, 1, 2, 3]], 400), ([[3, 0], [2, 1]], 250)):
        inputs, batch = _inputs(model, samples, rows, max_len, proc.pad_id)
        order = [i for r in rows for i in r if samples[i].kind == "gen"]  # token order of gen samples
        idx = [gens.index(samples[i]) for i in order]
        out = packed_losses(model, **inputs, latents=latents[idx], repa_target=repa_t[idx],
                            t=t[idx], noise=noise[idx])
        assert abs(float(out["ar"]) - ar_sum / ar_n) < 1e-5
        assert int(out["ar_tokens"]) == ar_n
        assert torch.allclose(out["rf_each"], torch.tensor(rf_ref)[idx], atol=1e-5)
        assert abs(float(out["repa"]) - sum(repa_ref) / 2) < 1e-5
        total = float(out["ar"]) + float(out["rf"]) + float(out["repa"])
        assert abs(float(out["loss"].detach()) - total) < 1e-5


def test_rf_times_follow_the_configured_logit_normal(tiny_copy):
    """t = sigmoid(N(t_mean, t_std)) drawn first from the step's generator; t_mean < 0 leans to noise."""
    model, proc = tiny_copy.model, tiny_copy.processor
    samples = _samples(proc, model.config)
    inputs, _ = _inputs(model, samples, [[0, 1, 2, 3]], 400, proc.pad_id)
    latents = model.encode_images(torch.stack([s.image for s in samples if s.kind == "gen"]))
    for mean, std in ((0.0, 1.0), (-1.5, 0.5)):
        with torch.no_grad():
            out = packed_losses(model, **inputs, latents=latents, t_mean=mean, t_std=std,
                                generator=torch.Generator().manual_seed(7))
        u = torch.randn(2, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(out["t"], torch.sigmoid(u * std + mean))


def test_rf_weight_scales_only_the_rf_term_and_its_gradients(tiny_copy):
    """loss = ar + rf_weight * rf + repa_weight * repa: g_dec (which only RF reaches) gets rf_weight
    times the gradient, the understanding aligner (which only AR reaches) the same one."""
    from models.packed import PackedObjective

    model, proc = tiny_copy.model, tiny_copy.processor
    randomize_(model)
    samples = _samples(proc, model.config)
    inputs, _ = _inputs(model, samples, [[0, 1, 2, 3]], 400, proc.pad_id)
    gen_pixels = torch.stack([s.image for s in samples if s.kind == "gen"])
    grads = {}
    for weight in (1.0, 4.0):
        model.zero_grad(set_to_none=True)
        out = PackedObjective(model, rf_weight=weight)(**inputs, gen_pixels=gen_pixels,
                                                       generator=torch.Generator().manual_seed(3))
        assert out["loss"].item() == pytest.approx(out["ar"].item() + weight * out["rf"].item()
                                                   + out["repa"].item(), rel=1e-5)
        out["loss"].backward()
        params = dict(model.named_parameters())
        grads[weight] = {k: params[k].grad.clone() for k in ("gen_decoder.out_proj.weight", "und_aligner.weight")}
    assert torch.allclose(grads[4.0]["gen_decoder.out_proj.weight"], 4 * grads[1.0]["gen_decoder.out_proj.weight"],
                          rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[4.0]["und_aligner.weight"], grads[1.0]["und_aligner.weight"], rtol=1e-4, atol=1e-7)
    assert grads[1.0]["und_aligner.weight"].abs().sum() > 0


def test_gradients_reach_every_trainable_part(tiny_copy):
    model, proc = tiny_copy.model, tiny_copy.processor
    samples = _samples(proc, model.config)
    inputs, batch = _inputs(model, samples, [[0, 1, 2, 3]], 400, proc.pad_id)
    gens = torch.stack([s.image for s in samples if s.kind == "gen"])
    out = packed_losses(model, **inputs, latents=model.encode_images(gens), repa_target=model.repa_target(gens))
    out["loss"].backward()
    for name in ("beg_of_und_embed", "und_aligner.weight", "gen_encoder.patchify.weight",
                 "gen_decoder.out_proj.weight", "repa_head.net.0.weight", "llm.model.embed_tokens.weight"):
        param = dict(model.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vae.parameters())


def test_frozen_encoders_run_under_the_objectives_autocast(tiny_copy):
    """With bf16 autocast the frozen VAE encode and the REPA target run in bf16 too (in fp32 they made a
    1.3B stage-2 step on an H200 17% slower); without autocast everything stays fp32."""
    from models.packed import PackedObjective

    model, proc = tiny_copy.model, tiny_copy.processor
    samples = _samples(proc, model.config)
    inputs, batch = _inputs(model, samples, [[0, 1], [2, 3]], 160, proc.pad_id)
    gen_pixels = torch.stack([s.image for s in samples if s.kind == "gen"])
    seen = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, set()).add(out.dtype)

    hooks = [model.vae.encoder.conv_in.register_forward_hook(record("vae")),
             model.vision.embeddings.patch_embedding.register_forward_hook(record("siglip"))]
    try:
        for dtype, expect in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
            seen.clear()
            out = PackedObjective(model, autocast_dtype=dtype)(**inputs, gen_pixels=gen_pixels,
                                                               generator=torch.Generator().manual_seed(0))
            assert seen == {"vae": {expect}, "siglip": {expect}}  # SigLIP: REPA target and und images
            assert torch.isfinite(out["loss"]) and out["rf"].dtype == torch.float32
    finally:
        for h in hooks:
            h.remove()


def _versus_dense(model, proc, device: str, other: str, *, grads: bool):
    """The packed losses (and, with grads, the LLM's gradients) with the dense mask under SDPA and
    under `other`: "flex" (the FlexAttention BlockMask built from the same rows) or "segments" (SDPA
    per block of whole samples, `models/attention.py`, with the same dense mask)."""
    from data.packing import flex_block_mask
    from models import attention as packed_attention

    samples = _samples(proc, model.config)
    inputs, batch = _inputs(model, samples, [[3, 0], [2, 1]], 256, proc.pad_id)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    model.to(device)
    gens = torch.stack([s.image for s in samples if s.kind == "gen"])[[1, 0]].to(device)  # row order: 3, 1
    latents = model.encode_images(gens)
    fixed = dict(latents=latents, repa_target=model.repa_target(gens), t=torch.tensor([0.3, 0.8], device=device),
                 noise=torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device))
    seg, vis, tog = (None if x is None else x.to(device)
                     for x in batch.mask_inputs(full_image=model.config.gen.full_image_attention))
    results = []
    second = (("flex_attention", flex_block_mask(seg, vis, tog)) if other == "flex"
              else (packed_attention.register(), inputs["attention_mask"]))
    for attention, mask in (("sdpa", inputs["attention_mask"]), second):
        model.llm.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            out = packed_losses(model, **{**inputs, "attention_mask": mask}, **fixed)
            if grads:
                out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.llm.named_parameters() if p.grad is not None}))
    model.llm.set_attn_implementation("sdpa")
    return results, (seg, vis, tog, inputs["attention_mask"])


@pytest.mark.parametrize("variant", ["release", "full_attention"])
def test_flex_block_mask_is_the_dense_mask(variant):
    """`attention: flex` builds a FlexAttention BlockMask from the (B, T) segment tensors instead of the
    dense (B, 1, T, T) mask: the same mask entry by entry, blocks between samples skipped, and the
    same packed losses (forward only: FlexAttention has no backward on CPU; the CUDA test does it)."""
    from data.packing import block_causal_mask_mod, flex_block_mask

    pipe = tiny_variant(variant)
    randomize_(pipe.model)
    ((dense, _), (flex, _)), (seg, vis, tog, mask) = _versus_dense(pipe.model, pipe.processor, "cpu", "flex",
                                                                    grads=False)
    b, t = seg.shape
    grid = block_causal_mask_mod(seg, vis, tog)(torch.arange(b)[:, None, None], None,
                                                torch.arange(t)[None, :, None], torch.arange(t)[None, None, :])
    assert torch.equal(grid, mask[:, 0])
    assert flex_block_mask(seg, vis, tog).sparsity() > 0
    for key in ("ar", "rf", "repa"):
        assert abs(float(dense[key]) - float(flex[key])) < 1e-5, key
    assert float(dense["ar"]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")
def test_flex_block_mask_trains_like_the_dense_mask_on_cuda():
    pipe = tiny_variant("release")
    randomize_(pipe.model)
    (dense, dense_grads), (flex, flex_grads) = _versus_dense(pipe.model, pipe.processor, "cuda", "flex",
                                                                        grads=True)[0]
    assert abs(float(dense["loss"]) - float(flex["loss"])) < 1e-4
    assert dense_grads.keys() == flex_grads.keys() and dense_grads
    for name, g in dense_grads.items():
        assert torch.allclose(g, flex_grads[name], atol=1e-4, rtol=1e-3), name


@pytest.mark.parametrize("variant", ["release", "full_attention"])
def test_segment_attention_trains_like_the_dense_mask(variant):
    """`attention: segments` runs SDPA once per block of whole samples (the CPU's way to skip the work
    between samples): the same losses and LLM gradients as the dense mask, causal or full image."""
    pipe = tiny_variant(variant)
    randomize_(pipe.model)
    ((dense, dense_grads), (seg, seg_grads)), (*_, mask) = _versus_dense(pipe.model, pipe.processor, "cpu",
                                                                        "segments", grads=True)
    from models.attention import row_blocks
    assert all(len(row_blocks(m)) > 1 for m in mask[:, 0])  # it did split the rows
    assert pipe.model.llm.config._attn_implementation == "sdpa"  # restored
    for key in ("loss", "ar", "rf", "repa"):
        assert abs(float(dense[key].detach()) - float(seg[key].detach())) < 1e-5, key
    assert dense_grads.keys() == seg_grads.keys() and dense_grads
    for name, g in dense_grads.items():
        assert torch.allclose(g, seg_grads[name], atol=1e-5, rtol=1e-4), name


def test_row_blocks_cut_only_between_samples():
    """The blocks are read off the mask: cut where no query crosses, merged up to a minimum size."""
    from data.packing import block_causal_mask
    from models.attention import row_blocks

    seg = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4 + [-1] * 4])  # three samples, then padding
    visible = seg >= 0
    mask = block_causal_mask(seg, visible)[0, 0]
    assert row_blocks(mask, min_block=1) == [5, 3, 4, 1, 1, 1, 1]  # padding: each token alone
    assert row_blocks(mask, min_block=4) == [5, 7, 4]
    assert row_blocks(mask, min_block=100) == [16]
    # a key the next sample may see (never the packing rule, but the mask decides): no cut there
    crossed = mask.clone()
    crossed[6, 2] = True
    assert row_blocks(crossed, min_block=1) == [8, 4, 1, 1, 1, 1]
    together = block_causal_mask(seg, visible, torch.tensor([[0, 0, 1, 1, 1] + [0] * 11], dtype=torch.bool))
    assert row_blocks(together[0, 0], min_block=1) == [5, 3, 4, 1, 1, 1, 1]  # later keys, same sample


def test_attention_and_depthwise_convs_stay_fp32_under_cpu_autocast(monkeypatch):
    """Under bf16 autocast on the CPU (`dtype: bf16`/`auto` with AMX) the segment attention and g_enc's
    / g_dec's depthwise convolutions run in fp32 (their bf16 CPU kernels are the slower ones): the
    same numbers as with autocast off, while the matmuls around them do run in bf16."""
    from models.adapters import ConvNeXtBlock
    from models.attention import segments_attention_forward
    from models.precision import fp32_on_cpu, resolve_dtype

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=gen) for _ in range(3))
    mask = torch.ones(24, 24, dtype=torch.bool).tril().expand(2, 1, 24, 24)
    module = torch.nn.Module()
    module.is_causal, module.training = False, False
    plain, _ = segments_attention_forward(module, q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, _ = segments_attention_forward(module, q, k, v, mask)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert kept.dtype == torch.float32 and torch.equal(kept, plain)
    assert dense.dtype == torch.bfloat16  # what autocast would have done to it

    block = ConvNeXtBlock(8, 4)
    x, cond = torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 4, generator=gen)
    seen = []
    block.dwconv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    block.fc1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cond)
    assert seen == [torch.float32, torch.bfloat16]
    assert fp32_on_cpu(torch.add, x, x).dtype == torch.float32  # no autocast: a plain call

    assert resolve_dtype("fp32", "cpu") == "fp32" and resolve_dtype("bf16", "cpu") == "bf16"
    import models.precision as precision
    for amx, expect in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda amx=amx: amx)
        assert precision.resolve_dtype("auto", "cpu") == expect
