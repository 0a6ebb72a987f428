"""Local RPC cluster, remote-tracker path, and ceilings measured through them."""


import pytest
from processes import group_alive

from workbench.ceilings import measure_ceilings
from workbench.rpc import DeviceError, LocalCluster, open_device, parse_tracker
from workbench.server import serve


def test_cluster_stops_every_process_it_started():
    with LocalCluster(threads=1) as cluster:
        groups = list(cluster.pids)
        assert cluster.device().run(lambda session: session.cpu(0).exist)
        # the server forked workers: more processes than the ones we started directly
        assert sum(len(group_alive(g)) for g in groups) > len(groups)
    for group in groups:
        assert group_alive(group) == [], "an RPC process outlived the cluster"


def test_a_kernel_runs_on_the_device_and_the_server_registered_workbench_functions(device):
    gemm = device.run(lambda session: session.get_function("workbench.ceilings.gemm_gflops")(64, 1))
    assert gemm > 0


def test_ceilings_measured_through_the_local_cluster(device):
    result = measure_ceilings(device, quick=True)
    assert len(result.peak_samples) == 3 and len(result.bandwidth_samples) == 3
    assert result.peak_gflops == max(result.peak_samples) > 1.0
    assert result.bandwidth_gbs == max(result.bandwidth_samples) > 0.5
    assert result.ridge_intensity == pytest.approx(result.peak_gflops / result.bandwidth_gbs)
    # Any CPU does more FLOPs per second from registers than it streams bytes from memory.
    assert result.peak_gflops > result.bandwidth_gbs
    assert result.gemm_gflops and result.gemm_gflops > 1.0


def test_a_tracker_given_by_address_is_used_as_a_remote_device(cluster):
    with open_device(tracker=f"127.0.0.1:{cluster.port}", key=cluster.key) as device:
        assert device.tracker == f"127.0.0.1:{cluster.port}"
        assert device.run(lambda session: session.cpu(0).exist)


def test_a_wrong_key_fails_at_once_naming_the_keys_there(cluster):
    # Opening the device asks it what it is: a key nobody registered fails right there.
    with pytest.raises(DeviceError, match=r"'no-such-board'.*keys there: \['workbench'\]"):
        with open_device(tracker=f"127.0.0.1:{cluster.port}", key="no-such-board"):
            pass


def test_bad_addresses_and_remote_binding_are_refused():
    with pytest.raises(DeviceError, match="HOST:PORT"):
        parse_tracker("localhost")
    with pytest.raises(DeviceError, match="--allow-remote"):
        serve(host="0.0.0.0", port=9999)
