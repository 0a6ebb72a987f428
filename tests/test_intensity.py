"""FLOPs, bytes and intensity against hand calculations."""

import pytest

from workbench.intensity import (algorithm_table, edge_convs, layer_table, roofline_prediction,
                                 winograd_arithmetic)
from workbench.model import reference_unet


@pytest.fixture(scope="module")
def table():
    return layer_table(reference_unet()).set_index("name")


def test_conv_flops_by_hand(table):
    # 2 x out_channels x in_channels x 3 x 3 x output pixels
    assert table.loc["enc0_conv1", "flops"] == 2 * 16 * 3 * 9 * 192 * 192 == 31_850_496
    assert table.loc["enc3_conv2", "flops"] == 2 * 128 * 128 * 9 * 24 * 24
    assert table.loc["head_conv", "flops"] == 2 * 2 * 16 * 9 * 192 * 192


def test_total_conv_flops_of_the_reference_unet(table):
    total = table[table.op == "conv"].flops.sum()
    assert abs(total - 2.261e9) / 2.261e9 < 1e-3


def test_bytes_and_intensity_by_hand(table):
    # enc0_conv1: input 3x192x192, weights 16x3x3x3 + 16 bias, output 16x192x192, float32
    moved = 4 * (3 * 192 * 192 + 16 * 3 * 9 + 16 + 16 * 192 * 192)
    assert table.loc["enc0_conv1", "bytes"] == moved
    assert table.loc["enc0_conv1", "intensity"] == pytest.approx(31_850_496 / moved)
    # a 2x2 max pool: 3 comparisons per output, reads the input and writes the output once
    assert table.loc["enc1_pool", "flops"] == 3 * 16 * 96 * 96
    assert table.loc["enc1_pool", "bytes"] == 4 * (16 * 192 * 192 + 16 * 96 * 96)
    # add reads both operands
    assert table.loc["dec0_add", "bytes"] == 4 * 3 * 16 * 192 * 192
    assert table.loc["dec0_resize", "flops"] == 0


def test_edge_layers_are_the_least_intensive_convs(table):
    model = reference_unet()
    convs = table[table.op == "conv"]
    middle = convs.drop(edge_convs(model))
    assert convs.loc[["enc0_conv1", "head_conv"], "intensity"].max() < middle.intensity.min()


def test_winograd_f6_multiplications_by_hand():
    layer = reference_unet().layer("enc2_conv2")  # 64 -> 64, 48x48 output
    row = winograd_arithmetic(layer, 6)
    assert row["multiplications"] == 64 * 64 * 8 * 8 * (48 // 6) ** 2
    assert row["speedup_bound"] > 2.5  # F(6,3) saves up to 36*9/64 ~ 5x in the multiplications


def test_algorithm_rules():
    model = reference_unet()
    algos = algorithm_table(model)
    assert algos.applies.all()  # every conv of the reference UNet is 3x3 stride 1
    from workbench.model import Layer, conv_layer

    strided = conv_layer("s2", "input", (1, 8, 32, 32), 8, kernel=3, stride=2)
    wide = conv_layer("k11", "input", (1, 8, 32, 32), 8, kernel=11, pad=5)
    from workbench.intensity import why_not_applicable

    assert "stride 1" in why_not_applicable(strided, "winograd_f6x6")
    assert why_not_applicable(wide, "fft8") and why_not_applicable(wide, "fft16") is None
    assert why_not_applicable(strided, "direct") is None


def test_roofline_prediction_marks_memory_bound_layers(table):
    pred = roofline_prediction(table.reset_index(), peak_gflops=200.0, bandwidth_gbs=20.0)
    by_name = pred.set_index("name")
    assert by_name.loc["dec0_add", "limited_by"] == "memory"
    assert by_name.loc["enc3_conv2", "limited_by"] == "compute"
    assert by_name.loc["enc3_conv2", "min_time_ms"] == pytest.approx(169_869_312 / 200e9 * 1e3)
