"""The kernels that read their weights before waiting for the kernel before them (programmatic dependent
launch: their weights do not depend on it) still do so in the machine code of every target. ptxas may put
the wait (griddepcontrol.wait, SASS ACQBULK) above loads it is free to move: it did in the read-ceiling kernel
until session 39, which for that reason never read ahead of its wait, and no test could tell."""
from functools import lru_cache

import pytest

from bench import sass_loop

# Every target's weight kernels that issue weight reads before their wait.
PREFETCHING = ("dsv4_fp8_gemv_m8", "dsv4_fp8_gemv_m16", "dsv4_fp8_gemv_fused_m8", "dsv4_fp8_gemv_fused_m16",
               "dsv4_fp8_gemv_fused_norm_m8", "dsv4_fp8_gemv_fused_swiglu_m8", "dsv4_fp8_gemv_fused_grouped_m8",
               "dsv4_head_gemv", "dsv4_head_gemv_bf16_rows", "dsv4_moe_down", "dsv4_hc_pre_finish_beside",
               "dsv4_stream_read")
# Hopper's alone (csrc/moe_decode_wgmma.cu, csrc/fp8_gemv_wgmma.cu): gate_up reads and quantises x, which the
# router before it also reads, so it is complete once gate_up starts.
PREFETCHING_SM90 = ("dsv4_moe_down_decode_wgmma", "dsv4_moe_gate_up_decode_wgmma", "dsv4_fp8_gemv_wgmma_m8",
                    "dsv4_fp8_gemv_wgmma_m16")


@pytest.fixture(scope="module")
def cuobjdump():
    try:
        return sass_loop.find_cuobjdump()
    except SystemExit:
        pytest.skip("needs cuobjdump (`pip install -e '.[test]'` brings NVIDIA's)")


@lru_cache(maxsize=None)
def sass(cuobjdump: str, fat_binary, arch: str) -> dict[str, list[tuple[int, str]]]:
    """Each kernel's SASS for `arch`, disassembled once for all the tests below."""
    return sass_loop.functions(sass_loop.run([cuobjdump, "-sass", "-arch", arch, str(fat_binary)]))


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a", "sm_120a", "sm_121a"])
def test_weight_kernels_read_before_their_wait(fat_binary, cuobjdump, arch):
    code = sass(cuobjdump, fat_binary, arch)
    expected = PREFETCHING + (PREFETCHING_SM90 if arch == "sm_90a" else ())
    assert set(expected) <= set(code), f"kernels missing from {arch}: {sorted(set(expected) - set(code))}"
    late = [name for name in expected if not sass_loop.reads_before_wait(code[name])]
    assert not late, f"{arch}: these kernels wait before their first weight read: {late}"


def test_the_check_tells_a_wait_before_the_reads():
    assert sass_loop.reads_before_wait([(0, "LDG.E.128 R4, desc[UR4][R2.64]"), (16, "ACQBULK")])
    assert not sass_loop.reads_before_wait([(0, "ACQBULK"), (16, "@!P0 LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]")])
    assert sass_loop.reads_before_wait([(0, "LDG.E.128 R4, desc[UR4][R2.64]")]) is None


def first_after_wait(code: list[tuple[int, str]], op: str) -> int | None:
    """Index of the first instruction of opcode `op` after the kernel's wait (ACQBULK)."""
    ops = [sass_loop.opcode(text) for _, text in code]
    wait = ops.index("ACQBULK")
    return next((i for i in range(wait + 1, len(ops)) if ops[i] == op), None)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a", "sm_120a", "sm_121a"])
def test_plain_fused_gemv_issues_its_early_step_between_the_rows_loads_and_their_quantise(fat_binary, cuobjdump,
                                                                                         arch):
    """wo_b's early ring step (csrc/fp8_linear.cu EARLY_STEP_K) pays only where its copies (LDGSTS) follow the
    activation row's loads (LDG) and precede the quantise's shuffles (SHFL): issued before the loads they
    delayed the row and cost 1-1.5 us a GEMV (session 41); after the quantise they are the plain loop's."""
    code = sass(cuobjdump, fat_binary, arch)
    for name in ("dsv4_fp8_gemv_fused_m8", "dsv4_fp8_gemv_fused_m16"):
        load, copy, shuffle = (first_after_wait(code[name], op) for op in ("LDG", "LDGSTS", "SHFL"))
        assert None not in (load, copy, shuffle) and load < copy < shuffle, f"{arch} {name}: {load, copy, shuffle}"
