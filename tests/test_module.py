"""The LightningModule's validation/test figures against an independent whole-split computation."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.distributions import Bernoulli, kl_divergence
from torchmetrics import MeanMetric

from sae.core.metrics import off_values, truncate_codes
from sae.data.mnist import MNISTDataModule
from sae.training.checkpoints import load_checkpoint
from sae.training.module import SparseAutoencoderModule


def quiet_trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


@pytest.mark.parametrize("recon_loss", ["mse", "bce"])
def test_validation_metrics_are_whole_split_figures(mnist_root, recon_loss):
    torch.manual_seed(0)
    module = SparseAutoencoderModule(
        recon_loss=recon_loss,
        activation="sigmoid",
        sparsity_layers=["encoder_1", "latent"],
        sparsity={"method": "kl", "rho": 0.1, "beta": 0.5},
    )
    with torch.no_grad():  # latent codes on both sides of the 0.1 threshold, so truncation matters
        module.net.encoder[-1][0].bias.fill_(-2.0)
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=100, eval_batch_size=7)
    got = quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
    assert (got.pop("step"), got.pop("epoch")) == (0, 0)  # the loggers' x-axis: no step taken yet

    x = dm.split("val")[0].double()
    net = module.net.double()
    with torch.no_grad():
        out = net(x)
    rho_hat = {k: v.mean(0) for k, v in out.activations.items()}
    kl = sum(
        kl_divergence(Bernoulli(probs=torch.full_like(q, 0.1)), Bernoulli(probs=q)).sum()
        for q in rho_hat.values()
    )
    layers = {"encoder_1": net.encoder[0](x)}  # every hidden layer, walked block by block
    layers["latent"] = net.encoder[1](layers["encoder_1"])
    layers["decoder_1"] = net.decoder[0](layers["latent"])
    firing = {k: (v > 0.1).double() for k, v in layers.items()}  # sigmoid layers: active above l0_threshold
    mse = ((out.recon - x) ** 2).mean()
    bce = -(x * out.recon.log() + (1 - x) * (1 - out.recon).log()).mean()
    recon = mse if recon_loss == "mse" else bce
    latent = rho_hat["latent"]
    sst = ((x - x.mean(0)) ** 2).sum()
    # truncated_mse: each latent unit's codes at or below 0.1 replaced by the mean of its such
    # codes on the first 10,000 training images, one unit at a time.
    train_codes = net.encoder(dm.split("train")[0][:10_000].double())
    truncated = out.code.clone()
    for j in range(out.code.shape[1]):
        off = train_codes[:, j][train_codes[:, j] <= 0.1]
        truncated[out.code[:, j] <= 0.1, j] = off.mean() if len(off) else 0.0
    truncated_mse = ((net.decoder(truncated) - x) ** 2).mean()
    assert not torch.equal(truncated, out.code)
    expected = {
        "val/truncated_mse": truncated_mse,
        "val/fvu": ((out.recon - x) ** 2).sum() / sst,
        "val/l0": (out.code > 0.1).sum(1).double().mean(),
        "val/l0@0.05": (out.code > 0.05).sum(1).double().mean(),
        "val/l0@0.5": (out.code > 0.5).sum(1).double().mean(),
        "val/rare_fraction": (firing["latent"].mean(0) < 1e-3).double().mean(),
        "val/dense_fraction": (firing["latent"].mean(0) > 0.5).double().mean(),
        "val/loss": recon + 0.5 * kl,
        "val/penalty": 0.5 * kl,  # what the penalty adds to the loss: beta * kl
        "val/mse": mse,
        "val/kl": kl,
        "val/rho_hat_mean": latent.mean(),
        "val/rho_hat_min": latent.min(),
        "val/rho_hat_max": latent.max(),
        "val/dead_fraction": (firing["latent"].sum(0) == 0).double().mean(),
    }
    for name in ("encoder_1", "decoder_1"):
        expected[f"val/{name}/dead_fraction"] = (firing[name].sum(0) == 0).double().mean()
        expected[f"val/{name}/dense_fraction"] = (firing[name].mean(0) > 0.5).double().mean()
    torch.testing.assert_close(out.code, layers["latent"])
    if recon_loss == "bce":
        expected["val/bce"] = bce
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-7), k


def test_truncated_code_hand_case():
    """Two units, threshold 0.1: the codes at or below it become the unit's mean of such codes."""
    codes = torch.tensor([[0.05, 0.9], [0.5, 0.02], [0.07, 0.04], [0.2, 0.6]])
    off = off_values(codes, 0.1)
    torch.testing.assert_close(off, torch.tensor([0.06, 0.03]))
    expected = torch.tensor([[0.06, 0.9], [0.5, 0.03], [0.06, 0.03], [0.2, 0.6]])
    torch.testing.assert_close(truncate_codes(codes, 0.1, off), expected)
    torch.testing.assert_close(off_values(torch.ones(3, 2), 0.1), torch.zeros(2))  # never off: 0


@pytest.mark.parametrize("method", ["l1", "topk"])
def test_truncated_mse_is_the_mse_for_exactly_sparse_codes(mnist_root, method):
    """ReLU and TopK codes are exactly 0 where L0 counts them off: the decoder already sees the
    truncated code, so truncated_mse is the MSE (to the last bit)."""
    torch.manual_seed(0)
    settings = {"method": "topk", "k": 4} if method == "topk" else {"method": "l1", "beta": 5e-3}
    module = SparseAutoencoderModule(
        sparsity=settings, latent_activation="topk" if method == "topk" else "relu"
    )
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=100)
    got = quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
    assert got["val/truncated_mse"] == got["val/mse"]


def test_dead_and_dense_units_of_every_layer_hand_case(mnist_root):
    """ReLU layers: a unit is dead when it is exactly 0 on every image of the split. Units made
    dead (negative bias, no weights) and always on (positive bias) are counted as such."""
    torch.manual_seed(0)
    module = SparseAutoencoderModule()
    first, decoder_hidden = module.net.encoder[0][0], module.net.decoder[0][0]
    with torch.no_grad():
        for layer, dead, always in (
            (first, range(0, 10), range(10, 13)),
            (decoder_hidden, range(5), range(5, 25)),
        ):
            layer.weight[list(dead) + list(always)] = 0.0
            layer.bias[list(dead)] = -1.0
            layer.bias[list(always)] = 1.0
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=100)
    got = quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
    x = dm.split("val")[0]
    with torch.no_grad():
        h = torch.relu(x @ first.weight.T + first.bias)
    never = int((h.amax(0) == 0).sum())
    assert never >= 10  # the ten made dead, and any the random weights left dead
    assert got["val/encoder_1/dead_fraction"] == pytest.approx(never / 128)
    assert got["val/encoder_1/dense_fraction"] == pytest.approx(
        int(((h > 0).double().mean(0) > 0.5).sum()) / 128
    )
    assert got["val/encoder_1/dense_fraction"] >= 3 / 128
    assert got["val/decoder_1/dead_fraction"] >= 5 / 128
    assert got["val/decoder_1/dense_fraction"] >= 20 / 128


def test_every_metric_starts_afresh_each_pass(mnist_root):
    """Validation on split B after split A gives B's figures: no metric state carries over, including
    one added to the module without registering it anywhere."""
    torch.manual_seed(0)
    module = SparseAutoencoderModule()
    extra = MeanMetric()
    module.split_metrics["val"]["extra"] = extra

    def data(split_seed: int) -> MNISTDataModule:
        return MNISTDataModule(root=str(mnist_root), download=False, val_size=100, split_seed=split_seed)

    quiet_trainer().validate(module, datamodule=data(0), verbose=False)
    with torch.inference_mode():  # as the pass made its states
        extra.update(torch.tensor(1.0))  # a state left over from the previous pass
    after_a = quiet_trainer().validate(module, datamodule=data(1), verbose=False)[0]
    assert not extra.update_called  # reset at the start of the pass
    fresh = SparseAutoencoderModule()
    fresh.load_state_dict(module.state_dict())
    alone = quiet_trainer().validate(fresh, datamodule=data(1), verbose=False)[0]
    assert after_a == pytest.approx(alone, rel=1e-6)


def test_fit_lowers_the_loss_and_checkpoint_reloads_weights_only(mnist_root, tmp_path):
    L.seed_everything(0, verbose=False)
    module = SparseAutoencoderModule(lr=3e-3)
    dm = MNISTDataModule(root=str(mnist_root), download=False, val_size=100, batch_size=50)
    trainer = quiet_trainer(max_epochs=5, default_root_dir=tmp_path)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain values only: no pickled objects
    assert raw["hyper_parameters"]["hidden_dims"] == [128]
    reloaded, _ = load_checkpoint(path)
    for (k, a), (_, b) in zip(module.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


class StepTerms(L.Callback):
    """Each optimizer step's loss, as handed to backward: the independent record."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append(float(loss.detach()))


def fit_small(
    mnist_root, tmp_path, batches_per_call: int, callbacks=(), **trainer_kw
) -> SparseAutoencoderModule:
    """Two epochs on 500 synthetic images in batches of 20 (25 steps an epoch)."""
    L.seed_everything(0, verbose=False)
    module = SparseAutoencoderModule(lr=3e-3)
    dm = MNISTDataModule(
        root=str(mnist_root), download=False, val_size=100, batch_size=20, batches_per_call=batches_per_call
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        **{"logger": False, **trainer_kw},
    )
    trainer.fit(module, datamodule=dm)
    return module


def test_train_metrics_are_means_over_each_logging_window(mnist_root, tmp_path):
    """train/loss at each written step is the mean of the per-step losses since the previous write."""
    record = StepTerms()
    logger = CSVLogger(tmp_path, name="csv", version="")
    fit_small(mnist_root, tmp_path, 4, [record], log_every_n_steps=6, logger=logger)
    assert len(record.losses) == 2 * 25

    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss", "train/mse", "train/kl_batch", "train/penalty", "epoch"} <= set(rows[0])
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}
    for r in (r for r in rows if r["train/loss"]):  # the penalty: beta (5e-3) * kl_batch, averaged alike
        assert float(r["train/penalty"]) == pytest.approx(5e-3 * float(r["train/kl_batch"]), rel=1e-4)
        difference = float(r["train/loss"]) - float(r["train/mse"])
        assert float(r["train/penalty"]) == pytest.approx(difference, abs=1e-7)
    # Every 6 optimizer steps, whatever the calls (of 4 batches) and epochs (of 25 steps): the
    # x-axis is the number of steps taken; 24 -> 30 spans the epoch end, 48 is the last.
    assert sorted(logged) == list(range(6, 51, 6))
    previous = 0
    for step in sorted(logged):
        window = record.losses[previous:step]
        assert logged[step] == pytest.approx(sum(window) / len(window), rel=1e-5), step
        previous = step


class CountBackward(L.Callback):
    """A callback with a per-step hook: the module must then take Lightning's step path."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls += 1


def test_every_optimizer_step_goes_through_lightning_with_several_batches_per_call(mnist_root, tmp_path):
    """8 batches per training call, each its own step: a callback's step hook runs on every one,
    and global_step counts them."""
    counter = CountBackward()
    wrapped = fit_small(mnist_root, tmp_path, 8, [counter])
    assert counter.calls == 50 and wrapped.trainer.global_step == 50


def test_grouping_batches_per_call_trains_the_same_weights(mnist_root, tmp_path):
    """data.batches_per_call is a speed setting only: every batch still gets its own step."""
    one, eight = (fit_small(mnist_root, tmp_path, k) for k in (1, 8))
    for (name, a), b in zip(one.state_dict().items(), eight.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert one.trainer.global_step == eight.trainer.global_step == 50  # optimizer steps, not calls


def test_decoded_units_of_a_linear_decoder_are_its_columns():
    """With identity activations decode(e_j) - decode(0) is the product of the decoder's weights,
    column j: what the figure of each latent unit's decoder image shows."""
    torch.manual_seed(0)
    module = SparseAutoencoderModule(
        input_dim=12, hidden_dims=[5], latent_dim=3, activation="identity", output_activation="identity"
    )
    first, second = module.net.decoder[0][0], module.net.decoder[1][0]
    expected = (second.weight.double() @ first.weight.double()).T  # (latent, input)
    torch.testing.assert_close(module.decoded_units().double(), expected, rtol=1e-5, atol=1e-6)


def test_checkpoints_with_retired_metric_settings_still_load(tmp_path):
    module = SparseAutoencoderModule()
    path = tmp_path / "old.ckpt"
    hparams = dict(module.hparams, dead_threshold=1e-3, saturation_level=0.5)  # as runs before them wrote
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    reloaded, _ = load_checkpoint(path)
    assert "dead_threshold" not in reloaded.hparams
    torch.testing.assert_close(reloaded.net.encoder[0][0].weight, module.net.encoder[0][0].weight)


@pytest.mark.parametrize(
    ("flat", "sparsity"),
    [
        ({"sparsity": "kl", "rho": 0.1, "beta": 0.5, "k": None}, {"method": "kl", "rho": 0.1, "beta": 0.5}),
        (
            {"sparsity": "topk", "k": 4, "rho": 0.05, "beta": 5e-3, "latent_activation": "topk"},
            {"method": "topk", "k": 4},
        ),
    ],
)
def test_a_checkpoint_from_before_methods_owned_their_settings_loads_as_one_value(tmp_path, flat, sparsity):
    """Older checkpoints hold every method's knobs beside the module's arguments: the method's own
    become its settings, the others' are dropped, and the weights load."""
    module = SparseAutoencoderModule(
        sparsity={"method": flat["sparsity"]} | {k: v for k, v in sparsity.items() if k != "method"},
        latent_activation=flat.get("latent_activation", "sigmoid"),
    )
    hparams = {k: v for k, v in module.hparams.items() if k != "sparsity"} | flat
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    reloaded, _ = load_checkpoint(path)
    assert {k: v for k, v in reloaded.hparams.sparsity.items() if k in sparsity} == sparsity
    assert reloaded.hparams.sparsity["method"] == flat["sparsity"] and "rho" not in reloaded.hparams
    torch.testing.assert_close(reloaded.net.encoder[0][0].weight, module.net.encoder[0][0].weight)
