"""Every test guest under isovisor, judged by the same Scenario as under QEMU."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from isovisor.kvm import Kvm
from isovisor.vmm.stop import StopReason
from tests.guests.expectations import ALL_SCENARIOS, serial_lines
from tests.guests.isovisor_runner import REPO, isovisor_cmd, run_isovisor, scenario_args

END_STATUS = {
    "reset": StopReason.GUEST_RESET.exit_status,
    "triplefault": StopReason.TRIPLE_FAULT.exit_status,
}


@pytest.mark.parametrize("name", sorted(ALL_SCENARIOS))
def test_guest_scenario(name: str, guest_elfs: dict[str, Path], kvm: Kvm) -> None:
    sc = ALL_SCENARIOS[name]
    send = (sc.serial_input.after, sc.serial_input.data) if sc.serial_input else None
    res = run_isovisor(scenario_args(guest_elfs[sc.guest], sc), timeout=sc.timeout_s * 2,
                       send_after=send)
    assert sc.check(res.stdout) == [], res.text
    assert res.returncode == END_STATUS[sc.end], res.stderr
    expected_reason = "guest reset" if sc.end == "reset" else "triple fault"
    assert f"isovisor: {expected_reason}" in res.stderr


def test_each_vcpu_sees_its_own_apic_id(guest_elfs: dict[str, Path], kvm: Kvm) -> None:
    sc = ALL_SCENARIOS["smp-4cpu"]
    res = run_isovisor(scenario_args(guest_elfs["smp"], sc), timeout=120)
    ids = sorted(int(m) for m in re.findall(r"apic=(\d+)", res.text))
    assert ids == [0, 1, 2, 3], res.text


def test_cpuid_topology_and_hypervisor_leaf(guest_elfs: dict[str, Path], kvm: Kvm) -> None:
    sc = ALL_SCENARIOS["cpuid"]
    res = run_isovisor(scenario_args(guest_elfs["cpuid"], sc, "--vcpus", "2"), timeout=60)
    fields = dict(line.split(": ", 1)[1].split("=", 1) for line in serial_lines(res.stdout))
    ebx = int(fields["leaf1_ebx"], 16)
    assert ebx >> 24 == 0  # the BSP's APIC id
    assert (ebx >> 16) & 0xFF == 2  # logical processors in the package: our two vCPUs
    assert fields["hypervisor"] == "1"
    assert fields["hv_signature"] == "KVMKVMKVM"


def test_independent_pvh_guest_boots(kvm: Kvm, tmp_path: Path) -> None:
    """A PVH guest written from the spec alone, not from our loader, boots and reports."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guests" / "independent")], check=True)
    elf = REPO / "guests" / "independent" / "build" / "pvh-spec-guest.elf"
    initrd = tmp_path / "initrd.bin"
    initrd.write_bytes(bytes(range(1, 9)) + b"\xaa" * 4088)
    res = run_isovisor(
        ["run", "--kernel", str(elf), "--initrd", str(initrd), "--memory", "64M",
         "--cmdline", "spec test 123"],
        timeout=60,
    )
    lines = serial_lines(res.stdout)
    assert "pvh-spec-guest: magic ok version=1" in lines
    assert 'pvh-spec-guest: cmdline="spec test 123"' in lines
    assert "pvh-spec-guest: modules=1" in lines
    assert "pvh-spec-guest: module 0 size=4096 first8=0102030405060708" in lines
    assert any(re.fullmatch(r"pvh-spec-guest: entry .* state=ok", x) for x in lines), lines
    ram = next(int(m.group(1)) for x in lines if (m := re.search(r"ram_kib=(\d+)", x)))
    assert 60000 <= ram <= 65536
    assert "pvh-spec-guest: rsdp=0x000e0000" in lines  # our ACPI tables, via start_info
    assert "pvh-spec-guest: rsdp signature=ok" in lines
    assert lines[-1] == "pvh-spec-guest: done"
    assert res.returncode == 0


def test_timeout_is_a_host_request(guest_elfs: dict[str, Path], kvm: Kvm) -> None:
    # echo waits for input forever: --timeout stops it as a host request
    res = run_isovisor(
        ["run", "--kernel", str(guest_elfs["echo"]), "--memory", "32M", "--timeout", "2"],
        timeout=60,
    )
    assert res.returncode == StopReason.HOST_REQUEST.exit_status
    assert "host request" in res.stderr and "--timeout" in res.stderr


def test_ctrl_c_stops_cleanly(guest_elfs: dict[str, Path], kvm: Kvm) -> None:
    proc = subprocess.Popen(
        isovisor_cmd("run", "--kernel", str(guest_elfs["echo"]), "--memory", "32M"),
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    seen = b""
    while b"echo: ready" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.read1(4096)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == StopReason.HOST_REQUEST.exit_status
    assert b"Traceback" not in err
    assert b"stopped by SIGINT" in err


def test_unemulable_instruction_stops_with_rip_and_bytes(kvm: Kvm, tmp_path: Path) -> None:
    """A guest whose kernel-mode code KVM cannot run stops with a precise report (on PVM
    hosts: xsave in ring 0; on hardware hosts the same guest just resets)."""
    from isovisor.vmm.host import HostKind, detect

    asm = tmp_path / "xsave.asm"
    asm.write_text(
        (REPO / "tests" / "guests" / "xsave_guest.asm").read_text()
    )
    elf = tmp_path / "xsave.elf"
    obj = tmp_path / "xsave.o"
    subprocess.run(["nasm", "-f", "elf32", "-I", str(REPO / "guests" / "include") + "/",
                    "-o", str(obj), str(asm)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", str(REPO / "guests" / "guest.ld"), "-o",
                    str(elf), str(obj)], check=True)
    res = run_isovisor(["run", "--kernel", str(elf), "--memory", "32M"], timeout=60)
    if detect().kind is HostKind.HARDWARE:
        assert res.returncode == 0
        return
    assert res.returncode == StopReason.EMULATION_ERROR.exit_status, res.stderr
    assert re.search(r"RIP=0x1[0-9a-f]{5}", res.stderr), res.stderr
    assert "0f ae" in res.stderr  # the xsave opcode bytes


def test_bad_kernel_is_one_sentence(tmp_path: Path, kvm: Kvm) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x00" * 60)
    res = run_isovisor(["run", "--kernel", str(bad)], timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    missing = run_isovisor(["run", "--kernel", str(tmp_path / "nope")], timeout=60)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_help_on_every_command() -> None:
    for args in (["--help"], ["run", "--help"]):
        out = subprocess.run(isovisor_cmd(*args), capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0
        assert "usage: isovisor" in out.stdout
    run_help = subprocess.run(isovisor_cmd("run", "--help"), capture_output=True, text=True,
                              cwd=REPO).stdout
    assert "exit status" in run_help and "triple fault" in run_help


def test_serial_input_from_a_unix_socket_and_output_to_a_file(
    guest_elfs: dict[str, Path], kvm: Kvm, tmp_path: Path
) -> None:
    import socket
    import threading

    path = tmp_path / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    out_file = tmp_path / "serial.log"

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if out_file.exists() and b"echo: ready" in out_file.read_bytes():
                    break
                time.sleep(0.05)
            conn.sendall(b"via socket\n")
            time.sleep(1)

    t = threading.Thread(target=serve)
    t.start()
    res = run_isovisor(
        ["run", "--kernel", str(guest_elfs["echo"]), "--memory", "32M",
         "--serial", f"file:{out_file}", "--serial-input", f"unix:{path}"],
        timeout=60,
    )
    t.join()
    server.close()
    assert res.returncode == 0, res.stderr
    assert res.stdout == b""  # the guest's output went to the file, not stdout
    assert "echo: via socket" in serial_lines(out_file.read_bytes())
