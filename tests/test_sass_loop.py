"""bench/sass_loop.py reads cuobjdump's SASS: kernels apart, and the innermost loop around the first MMA."""
from bench.sass_loop import functions, innermost_mma_loop, opcode

SASS = """
        code for sm_90a
                Function : outer_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   LDS R5, [R2] ;
        /*0030*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
                Function : no_mma
        /*0000*/                   EXIT ;
"""


def test_the_innermost_loop_around_the_first_mma_is_found():
    code = functions(SASS)
    assert sorted(code) == ["no_mma", "outer_kernel"] and len(code["outer_kernel"]) == 8
    loop = innermost_mma_loop(code["outer_kernel"])
    assert [a for a, _ in loop] == [0x20, 0x30, 0x40]          # not the outer 0x10-0x60 loop
    assert [opcode(ins) for _, ins in loop] == ["LDS", "HMMA", "BRA"]
    assert innermost_mma_loop(code["no_mma"]) is None
