import math

import pytest
import torch
import torch.nn.functional as F

from dinov3.train.heads import DINOHead
from dinov3.train.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp


def test_sinkhorn_rows_sum_to_one_and_balance_prototypes():
    torch.manual_seed(0)
    logits = torch.randn(24, 7, dtype=torch.float64) + torch.linspace(0, 2, 7, dtype=torch.float64)
    q = sinkhorn_knopp(logits, temp=1.0, n_iterations=3)
    assert q.shape == logits.shape and (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(24, dtype=q.dtype), rtol=0, atol=1e-5)
    assert q.dtype == torch.float32  # computed in fp32 whatever the logits' dtype, as official
    # Columns are pushed to equal mass N/K: far more balanced than the plain softmax.
    target = torch.full((7,), 24 / 7, dtype=torch.float64)
    softmax_imbalance = (F.softmax(logits, -1).sum(0) - target).abs().max()
    sk_imbalance = (q.sum(0) - target).abs().max()
    assert sk_imbalance < 0.2 * softmax_imbalance
    # Many iterations converge to a doubly-stochastic (scaled) matrix.
    q50 = sinkhorn_knopp(logits, temp=1.0, n_iterations=50)
    torch.testing.assert_close(q50.sum(0).double(), target, rtol=0, atol=1e-4)


def test_sinkhorn_matches_textbook_alternating_normalisation():
    torch.manual_seed(1)
    logits = torch.randn(10, 5, dtype=torch.float64)
    p = torch.exp(logits / 0.1)
    p = p / p.sum()
    for _ in range(3):
        p = p / p.sum(0, keepdim=True) / 5  # prototypes: mass 1/K each
        p = p / p.sum(1, keepdim=True) / 10  # samples: mass 1/N each
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1).double(), p * 10, rtol=1e-5, atol=1e-6)


def _dino_loss_loops(student, teacher_probs, temp, ignore_diagonal):
    total, pairs = 0.0, 0
    for s in range(student.shape[0]):
        for t in range(teacher_probs.shape[0]):
            if ignore_diagonal and s == t:
                continue
            logp = torch.log_softmax(student[s] / temp, -1)
            total = total - (teacher_probs[t] * logp).sum(-1).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("ignore_diagonal", [False, True])
@pytest.mark.parametrize("n_student", [2, 3])
def test_dino_loss_against_loops(ignore_diagonal, n_student):
    torch.manual_seed(0)
    student = torch.randn(n_student, 5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 5, 11, dtype=torch.float64), -1)
    loss = DINOLoss(11, student_temp=0.1)(student, teacher, ignore_diagonal=ignore_diagonal)
    ref = _dino_loss_loops(student, teacher, 0.1, ignore_diagonal)
    torch.testing.assert_close(loss.double(), ref)


def test_ibot_loss_is_mean_per_image_over_masked_tokens():
    torch.manual_seed(0)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, [0]] = True
    m = int(masks.sum())
    s = torch.randn(m, 9, dtype=torch.float64)
    t = torch.softmax(torch.randn(m, 9, dtype=torch.float64), -1)
    weights = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks].double()
    loss = iBOTPatchLoss(9, student_temp=0.1).forward_masked(s, t, masks=masks, masks_weight=weights)
    ce = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (ce[:3].mean() + ce[3:].mean()) / 4  # two masked images, divided by all 4 images
    torch.testing.assert_close(loss.double(), expected)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_head_shapes_and_normalised_bottleneck(weight_norm):
    head = DINOHead(16, 40, nlayers=3, hidden_dim=24, bottleneck_dim=8, weight_norm=weight_norm)
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 40)
    # The prototype layer sees unit-norm codes: scaling the input of the last layer's input changes nothing.
    code = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(out, head.last_layer(code))
    assert math.isclose(float(code.detach().norm(dim=-1).mean()), 1.0, rel_tol=1e-5)
    if weight_norm:
        g = head.last_layer.parametrizations.weight.original0
        w = head.last_layer.weight
        torch.testing.assert_close(w.norm(dim=1), g.flatten().expand(40), rtol=1e-5, atol=1e-6)


def test_dino_head_loss_and_sinkhorn_learn_on_separable_inputs():
    """Head + DINO loss + Sinkhorn-Knopp + EMA teacher, on two noisy views of 8 well-separated clusters: the loss
    must fall well below log K (the uniform-prediction plateau a broken loss, centering or head would sit at)."""
    import copy

    g = torch.Generator().manual_seed(0)
    K, B, dim = 32, 64, 16
    centers = 3 * torch.randn(8, dim, generator=g)
    student = DINOHead(dim, K, nlayers=2, hidden_dim=64, bottleneck_dim=16)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DINOLoss(K, student_temp=0.1)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        labels = torch.randint(0, 8, (B,), generator=g)
        views = centers[labels][None] + 0.3 * torch.randn(2, B, dim, generator=g)  # (2 crops, B, dim)
        with torch.no_grad():
            t_logits = teacher(views.flatten(0, 1))
            probs = loss_fn.sinkhorn_knopp_teacher(t_logits, teacher_temp=0.05).view(2, B, K)
        loss = loss_fn(student(views.flatten(0, 1)).view(2, B, K), probs, ignore_diagonal=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(0.9).add_(ps, alpha=0.1)
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and sum(losses[-20:]) / 20 < math.log(K) - 1.0, (losses[0], losses[-20:])


# ---- the trainer's switch: dinov3_kernels' fused head losses against this module's -----------------------------------
@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_fused_head_losses_match_the_official_path_in_a_training_step(image_dir, tiny_overrides, centering):
    from dinov3.train.config import load_config
    from dinov3.train.data import BatchAugment, build_loader
    from dinov3.train.ssl_arch import SSLMetaArch

    base = tiny_overrides + ["ibot.mask_sample_probability=1.0", f"train.centering={centering}"]
    archs, results = {}, {}
    for kind in ("official", "fused"):
        cfg = load_config("tiny", base + [f"train.head_loss_backend={kind}"])
        torch.manual_seed(0)
        archs[kind] = SSLMetaArch(cfg).train()
    archs["fused"].load_state_dict(archs["official"].state_dict())
    cfg = archs["official"].cfg
    assert load_config("tiny", [])["train"]["head_loss_backend"] == "fused"  # the default
    _, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=1)
    batch = BatchAugment(cfg, torch.device("cpu"))(next(iter(loader)), iteration=0, rank=0)
    assert batch["mask_indices"].numel() > 0
    for kind, arch in archs.items():
        if centering == "softmax":  # a non-trivial center, updated by the step
            with torch.no_grad():
                arch.dino_loss.center.copy_(torch.linspace(-0.5, 0.5, arch.dino_loss.center.numel()).view_as(
                    arch.dino_loss.center))
                arch.ibot_loss.center.copy_(torch.linspace(0.3, -0.3, arch.ibot_loss.center.numel()).view_as(
                    arch.ibot_loss.center))
        torch.manual_seed(1)  # drop path and anything else random draws the same in both steps
        results[kind] = arch.forward_backward(batch, teacher_temp=0.04, iteration=0)
    (t_off, l_off), (t_fus, l_fus) = results["official"], results["fused"]
    assert set(l_off) == set(l_fus)
    for key in l_off:
        torch.testing.assert_close(l_fus[key], l_off[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(t_fus, t_off, rtol=1e-5, atol=1e-6)
    official = dict(archs["official"].student.named_parameters())
    for name, p in archs["fused"].student.named_parameters():
        q = official[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            scale = q.grad.abs().max().clamp(min=1e-12)
            assert (p.grad - q.grad).abs().max() <= 1e-4 * scale + 1e-9, name
    if centering == "softmax":
        for loss in ("dino_loss", "ibot_loss"):
            torch.testing.assert_close(getattr(archs["fused"], loss).center, getattr(archs["official"], loss).center)
