"""The networks are the same in both frameworks: same layers, same parameter counts."""
import pytest

from scaling.workloads import PARAMETERS


def test_expected_counts():
    assert PARAMETERS == {"mlp": 101_770, "cnn": 1_199_882}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_torch_parameter_count(name):
    torch_models = pytest.importorskip("scaling.workloads.torch_models")
    assert torch_models.parameter_count(torch_models.build(name)) == PARAMETERS[name]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_tf_parameter_count(name):
    tf_models = pytest.importorskip("scaling.workloads.tf_models")
    assert tf_models.parameter_count(tf_models.build(name)) == PARAMETERS[name]


def test_same_layer_shapes_and_dropout():
    """Layer by layer, the trainable tensors match (Keras stores Dense kernels transposed)."""
    torch_models = pytest.importorskip("scaling.workloads.torch_models")
    tf_models = pytest.importorskip("scaling.workloads.tf_models")
    for name in ("mlp", "cnn"):
        t_shapes = [tuple(p.shape) for p in torch_models.build(name).parameters()]
        k_shapes = [tuple(v.shape) for v in tf_models.build(name).trainable_variables]
        assert len(t_shapes) == len(k_shapes)
        for t, k in zip(t_shapes, k_shapes):
            assert sorted(t) == sorted(k), (name, t, k)
    t_drop = [m.p for m in torch_models.build("cnn").modules() if m.__class__.__name__ == "Dropout"]
    k_drop = [layer.rate for layer in tf_models.build("cnn").layers if layer.__class__.__name__ == "Dropout"]
    assert t_drop == k_drop == [0.25, 0.5]
    assert [m.p for m in torch_models.build("mlp").modules() if m.__class__.__name__ == "Dropout"] == [0.2]


@pytest.mark.parametrize("name, hidden, expected", [("mlp", 128, 101_770), ("mlp", 1024, 814_090),
                                                    ("mlp", 4096, 3_256_330), ("cnn", 256, 2_380_938)])
def test_hidden_width_is_the_model_size_axis_in_both_frameworks(name, hidden, expected):
    from scaling.workloads import label, parameters

    torch_models = pytest.importorskip("scaling.workloads.torch_models")
    tf_models = pytest.importorskip("scaling.workloads.tf_models")
    workload = {"name": name, "hidden": hidden}
    assert parameters(workload) == expected
    assert torch_models.parameter_count(torch_models.build(workload)) == expected
    assert tf_models.parameter_count(tf_models.build(workload)) == expected
    assert label(workload) == (name if hidden == 128 else f"{name}-h{hidden}")
