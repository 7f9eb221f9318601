"""fill_args: the one way Python fills the C++ kernels' argument structs."""
import pytest
import torch

import collapsekit._C as C
from collapsekit._library import fill_args, struct_fields

# The argument struct of each kernel entry point, with its fields as declared in csrc/<family>.h.
_ROWS = {"features", "feature_dtype", "N", "D", "fs0", "fs1", "labels", "label_dtype", "K", "ls0", "ls1",
         "weights", "ws0", "ws1"}
STRUCTS = {
    "ClassSumsArgs": _ROWS | {"C", "sums", "counts", "path", "num_threads"},
    "WithinClassArgs": _ROWS | {"C", "means", "out", "num_threads"},
    "CenterRowsArgs": {"features", "feature_dtype", "R", "D", "fs0", "fs1", "labels", "label_dtype", "ls0",
                       "weights", "ws0", "C", "means", "out", "out_weights", "num_threads"},
    "PairwiseTileArgs": {"gram", "gram_dtype", "ta", "tb", "gs0", "norms2_a", "norms2_b", "var_a", "var_b",
                         "strict_upper", "inv_k1", "out", "num_threads"},
    "ArgminTileArgs": {"dots", "dtype", "R", "T", "ds0", "offsets", "alpha", "col0", "best", "best_idx",
                       "num_threads"},
    "NormalizeRowsArgs": {"features", "feature_dtype", "R", "D", "fs0", "fs1", "eps", "scale", "out", "inv_norms",
                          "num_threads"},
    "NormalizeRowsBackwardArgs": {"features", "feature_dtype", "R", "D", "fs0", "fs1", "eps", "grad",
                                  "num_threads"},
}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_declared_fields(name):
    assert struct_fields(name) == STRUCTS[name]


def _normalize_fields(h, out, **over):
    f = dict(features=h, feature_dtype=0, R=h.shape[0], D=h.shape[1], fs0=h.stride(0), fs1=h.stride(1),
             eps=1e-12, scale=2.0, out=out, inv_norms=None, num_threads=1)
    f.update(over)
    return f


def test_fill_and_call():
    h = torch.randn(3, 5)
    out = torch.empty(3, 5)
    a = fill_args("NormalizeRowsArgs", **_normalize_fields(h, out))
    assert a.features == h.data_ptr() and a.out == out.data_ptr() and a.inv_norms == 0
    assert a.R == 3 and a.D == 5 and a.scale == 2.0
    C.normalize_rows(a)
    torch.testing.assert_close(out, 2.0 * torch.nn.functional.normalize(h, dim=1))


def test_unknown_field():
    h = torch.randn(2, 2)
    with pytest.raises(TypeError, match=r"NormalizeRowsArgs has no field\(s\) \['sacle'\]"):
        fill_args("NormalizeRowsArgs", sacle=1.0, **_normalize_fields(h, h))


def test_missing_field():
    h = torch.randn(2, 2)
    f = _normalize_fields(h, h)
    del f["eps"], f["num_threads"]
    with pytest.raises(TypeError, match=r"NormalizeRowsArgs field\(s\) \['eps', 'num_threads'\] left unset"):
        fill_args("NormalizeRowsArgs", **f)


def test_wrong_type():
    h = torch.randn(2, 2)
    with pytest.raises(TypeError, match=r"NormalizeRowsArgs\.R cannot hold 2\.5"):
        fill_args("NormalizeRowsArgs", **_normalize_fields(h, h, R=2.5))


def test_unknown_struct():
    with pytest.raises(TypeError, match="no argument struct 'NoSuchArgs'"):
        fill_args("NoSuchArgs")


def test_structs_reject_unknown_attributes():
    # no py::dynamic_attr(): a misspelt field cannot be set on a struct by hand either
    a = C.ArgminTileArgs()
    with pytest.raises(AttributeError):
        a.offset = 1


def test_meta_tensor_rejected():
    h = torch.randn(2, 2)
    with pytest.raises(ValueError, match="NormalizeRowsArgs.out must be a CPU tensor"):
        fill_args("NormalizeRowsArgs", **_normalize_fields(h, torch.empty(2, 2, device="meta")))
