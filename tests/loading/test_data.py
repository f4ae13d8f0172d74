"""Data specs: built-ins, files, factories, selection and errors."""
import h5py
import numpy as np
import pytest
import torch

from sam_probe.errors import SpecError
from sam_probe.loading.data import DataSelection, load_data


def test_digits_splits_and_standardisation():
    tr, te = load_data("digits"), load_data("digits", split="test")
    assert (len(tr), len(te)) == (1437, 360)
    assert tr.inputs.shape == (1437, 64) and tr.inputs.dtype == torch.float32 and tr.targets.dtype == torch.int64
    assert tr.n_classes == 10 and tr.image_shape == (1, 8, 8)
    assert torch.allclose(tr.inputs.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.equal(tr.inputs[:, 0], torch.zeros(1437))  # a zero-std pixel stays 0
    assert torch.bincount(te.targets).min() >= 34  # stratified
    assert tr.pixel_means.shape == (64,) and float(tr.pixel_means.max()) <= 16 and float(tr.pixel_means[0]) == 0
    assert load_data("digits", options={"flatten": False}).inputs.shape == (1437, 1, 8, 8)


def test_digits_read_without_scikit_learn_equal_its_loader_and_split():
    """The CSV read and the shipped seed-0 split are scikit-learn's own; another seed still asks it.
    (That digits commands then import no scikit-learn: tests/test_cli.py.)"""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from sam_probe.loading.data import _digits_split, digits_arrays

    X, y = load_digits(return_X_y=True)
    Xc, yc = digits_arrays()
    assert np.array_equal(X, Xc) and np.array_equal(y, yc) and Xc.dtype == X.dtype
    for seed in (0, 1):
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
        _, _, got_tr, got_te = _digits_split(seed)
        assert np.array_equal(got_tr, np.sort(tr)) and np.array_equal(got_te, np.sort(te))


def test_max_samples_seeded_and_reproducible():
    a = load_data("digits", max_samples=50, seed=1)
    b = load_data("digits", max_samples=50, seed=1)
    c = load_data("digits", max_samples=50, seed=2)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    full = load_data("digits")
    rows = [int(torch.nonzero((full.inputs == x).all(1))[0]) for x in a.inputs]
    assert rows == sorted(rows) and len(set(rows)) == 50
    assert a.meta["max_samples"] == 50 and len(load_data("digits", max_samples=10**6)) == 1437
    scale, shift = a.raw_affine
    raw = a.inputs * scale + shift  # back to the 0..16 intensities of the selected images
    assert torch.allclose(raw, raw.round(), atol=1e-4) and float(raw.max()) <= 16 + 1e-4
    assert torch.allclose(a.pixel_means, raw.mean(0), atol=1e-5) and not torch.allclose(a.pixel_means, full.pixel_means)


def test_synthetic_minor_major():
    s = load_data("synthetic-minor-major", options={"n": 64, "d": 6, "decay": 0.5})
    assert s.inputs.shape == (64, 6) and s.n_classes is None and s.meta["loss"] == "mse"
    assert torch.allclose(s.inputs.abs().mean(0), 0.5 ** torch.arange(6.0))
    assert torch.allclose(s.targets, s.inputs.sum(1), atol=1e-6)
    t = load_data("synthetic-minor-major", split="test", options={"n": 64, "d": 6})
    assert len(t) == 16 and not torch.equal(t.inputs[:16], s.inputs[:16])
    sign = load_data("synthetic-minor-major", options={"n": 32, "d": 4, "labels": "sign", "teacher": [1, -1, 0, 0]})
    assert set(sign.targets.tolist()) <= {0.0, 1.0} and sign.meta["loss"] == "bce"
    assert torch.equal(sign.targets, (sign.inputs[:, 0] - sign.inputs[:, 1] > 0).float())
    al = load_data("synthetic-minor-major", options={"n": 8, "d": 5, "features": "aligned"})
    assert torch.equal(al.inputs.abs(), (0.5 ** torch.arange(5.0)).expand(8, 5))
    assert torch.equal(al.targets, (al.inputs[:, 0] > 0).float())
    g = load_data("synthetic-minor-major", options={"features": "gaussian", "data_seed": 3})
    assert torch.equal(g.inputs, load_data("synthetic-minor-major", options={"features": "gaussian", "data_seed": 3}).inputs)
    with pytest.raises(SpecError, match="did you mean 'decay'"):
        load_data("synthetic-minor-major", options={"decai": 0.5})


def test_pt_npz_h5_files(tmp_path):
    x, y = torch.randn(12, 3), torch.arange(12) % 3
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    torch.save((x, y.float()), tmp_path / "pair.pt")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["inputs"], f["targets"] = x.numpy(), y.numpy()
    for name in ("d.pt", "d.npz", "d.h5"):
        s = load_data(str(tmp_path / name))
        assert torch.allclose(s.inputs, x) and torch.equal(s.targets, y) and s.n_classes == 3
    p = load_data(str(tmp_path / "pair.pt"), max_samples=5)
    assert len(p) == 5 and p.targets.dtype == torch.float32 and p.n_classes is None
    torch.save({"inputs": torch.randn(4, 1, 8, 8), "targets": torch.zeros(4, dtype=torch.long)}, tmp_path / "img.pt")
    assert load_data(str(tmp_path / "img.pt")).image_shape == (1, 8, 8)


def test_file_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_data(str(tmp_path / "missing.pt"))
    torch.save({"a": torch.zeros(2)}, tmp_path / "keys.pt")
    with pytest.raises(SpecError, match="inputs/targets"):
        load_data(str(tmp_path / "keys.pt"))
    torch.save({"inputs": torch.zeros(3, 2), "targets": torch.zeros(2)}, tmp_path / "len.pt")
    with pytest.raises(SpecError, match="3 inputs but 2 targets"):
        load_data(str(tmp_path / "len.pt"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SpecError, match="cannot read"):
        load_data(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "obj.npz", inputs=np.array([{"a": 1}], dtype=object), targets=np.zeros(1))
    with pytest.raises(SpecError, match="cannot read"):
        load_data(str(tmp_path / "obj.npz"))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(SpecError, match="unsupported file type"):
        load_data(str(tmp_path / "data.csv"))


def test_pickle_in_pt_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"inputs": torch.zeros(2, 2), "targets": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    marker.unlink(missing_ok=True)
    with pytest.raises(SpecError, match="cannot read"):
        load_data(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_factories(tmp_path):
    f = tmp_path / "mydata.py"
    f.write_text(
        "import torch\n"
        "class DS(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 6\n"
        "    def __getitem__(self, i): return torch.full((2,), float(i)), i % 2\n"
        "def dataset(split='train'):\n    return DS()\n"
        "def pair(n=4):\n    return torch.randn(n, 3), torch.randn(n)\n"
        "def selection():\n    import sam_probe.loading.data as d\n"
        "    return d.DataSelection(torch.zeros(2, 1), torch.zeros(2), 'mine')\n")
    ds = load_data(f"{f}:dataset")
    assert ds.streamed and len(ds) == 6 and ds.inputs is None and ds.meta["loss"] == "ce"  # read chunk by chunk
    x, y = next(ds.batches().slices(0, 6, 6))
    assert x.shape == (6, 2) and y.tolist() == [0, 1, 0, 1, 0, 1]
    assert len(load_data(f"{f}:pair", options={"n": 7})) == 7
    assert isinstance(load_data(f"{f}:selection"), DataSelection)
    with pytest.raises(SpecError, match="did you mean 'pair'"):
        load_data(f"{f}:pairs")


def test_unknown_and_cifar_errors(tmp_path):
    with pytest.raises(SpecError, match="did you mean 'digits'"):
        load_data("digit")
    with pytest.raises(SpecError, match="--split"):
        load_data("digits", split="val")
    with pytest.raises(SpecError, match="max-samples"):
        load_data("digits", max_samples=0)
    with pytest.raises(SpecError, match="torchvision|no CIFAR-10"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(SpecError, match="cifar10:ROOT"):
        load_data("cifar10")


# ----------------------------------------------------------- dict batches, token data, streamed factories
def test_dict_files_keep_integer_dtypes(tmp_path):
    ids = torch.randint(0, 9, (6, 4))
    d = {"input_ids": ids, "attention_mask": torch.ones(6, 4, dtype=torch.bool), "labels": torch.arange(6) % 2}
    torch.save(d, tmp_path / "tok.pt")
    np.savez(tmp_path / "tok.npz", **{k: v.numpy() for k, v in d.items()})
    with h5py.File(tmp_path / "tok.h5", "w") as f:
        for k, v in d.items():
            f[k] = v.numpy()
    for name in ("tok.pt", "tok.npz", "tok.h5"):
        s = load_data(str(tmp_path / name), max_samples=4)
        assert isinstance(s.inputs, dict) and s.inputs["input_ids"].dtype == torch.int64
        assert s.inputs["attention_mask"].dtype == torch.bool and s.n_classes == 2 and s.meta["loss"] == "ce"
        assert len(s) == 4 and s.targets is None
    torch.save({"inputs": ids}, tmp_path / "only.pt")  # token-only: a language model's data
    only = load_data(str(tmp_path / "only.pt"))
    assert torch.equal(only.inputs, ids) and only.targets is None and only.meta["loss"] == "lm"


def test_iterable_and_dataloader_factories_equal_the_data_in_memory(tmp_path):
    f = tmp_path / "streams.py"
    f.write_text(
        "import torch\n"
        "X = torch.randn(30, 3, generator=torch.Generator().manual_seed(0)); Y = torch.arange(30) % 3\n"
        "class It(torch.utils.data.IterableDataset):\n"
        "    def __iter__(self):\n        return iter([(X[i], Y[i]) for i in range(30)])\n"
        "def iterable():\n    return It()\n"
        "def loader():\n"
        "    ds = torch.utils.data.TensorDataset(X, Y)\n"
        "    return torch.utils.data.DataLoader(ds, batch_size=7, shuffle=True)\n"
        "def memory():\n    return X, Y\n")
    mem = load_data(f"{f}:memory", max_samples=11, seed=3)
    for name in ("iterable", "loader"):
        s = load_data(f"{f}:{name}", max_samples=11, seed=3)
        assert s.streamed and len(s) == 11
        chunks = list(s.batches().slices(0, 11, 4))
        assert [len(c[0]) for c in chunks] == [4, 4, 3]  # never one tensor of the whole selection
        assert torch.equal(torch.cat([c[0] for c in chunks]), mem.inputs)
        assert torch.equal(torch.cat([c[1] for c in chunks]), mem.targets)
    assert load_data(f"{f}:loader").chunk_hint == 7


def test_torchvision_spec_through_a_stand_in(tmp_path, monkeypatch):
    """torchvision does not install beside torch 2.13 here: a stand-in module checks the streamed path."""
    import sys
    import types

    tv, dsm, tr = (types.ModuleType(n) for n in ("torchvision", "torchvision.datasets", "torchvision.transforms"))

    class FakeMNIST(torch.utils.data.Dataset):
        def __init__(self, root, train=True, download=False, transform=None):
            assert download is False and root == str(tmp_path)
            self.n = 5 if train else 2

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i

    dsm.FakeMNIST, tr.ToTensor = FakeMNIST, lambda: None
    tv.datasets, tv.transforms = dsm, tr
    for name, mod in (("torchvision", tv), ("torchvision.datasets", dsm), ("torchvision.transforms", tr)):
        monkeypatch.setitem(sys.modules, name, mod)
    s = load_data(f"torchvision:FakeMNIST:{tmp_path}")
    assert s.streamed and len(s) == 5 and s.meta["loss"] == "ce"
    assert len(load_data(f"torchvision:FakeMNIST:{tmp_path}", split="test")) == 2
    with pytest.raises(SpecError, match="no dataset"):
        load_data(f"torchvision:Nope:{tmp_path}")


def test_hf_datasets_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")  # optional: pip install datasets
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]], "label": [0, 1], "text": ["a", "b"]})
    ds.save_to_disk(str(tmp_path / "d"))
    s = load_data(f"hf:{tmp_path / 'd'}")
    x, y = next(s.batches().slices(0, 2, 2))
    assert s.streamed and set(x) == {"input_ids", "label"} and x["input_ids"].dtype == torch.int64


def test_hostile_npz_and_h5_data_files(tmp_path):
    """Data files get the results reader's checks: no zip bombs, no links or external storage."""
    np.savez_compressed(tmp_path / "bomb.npz", inputs=np.zeros((300, 1 << 20), dtype=np.uint8), targets=np.zeros(300))
    with pytest.raises(SpecError, match="zip bomb"):
        load_data(str(tmp_path / "bomb.npz"))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x07" * 32)
    with h5py.File(tmp_path / "ext.h5", "w") as f:
        f.create_dataset("inputs", shape=(4, 8), dtype="u1", external=[(str(secret), 0, 32)])
        f["targets"] = np.zeros(4)
    with pytest.raises(SpecError, match="outside the file"):
        load_data(str(tmp_path / "ext.h5"))
    with h5py.File(tmp_path / "link.h5", "w") as f:
        f["inputs"] = h5py.ExternalLink(str(tmp_path / "ext.h5"), "/targets")
        f["targets"] = np.zeros(4)
    with pytest.raises(SpecError, match="ExternalLink"):
        load_data(str(tmp_path / "link.h5"))
