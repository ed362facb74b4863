"""OpenBLAS kernel choice: a generic fallback on a modern processor gets the right core type."""

from reverie.runtime.blas import core_type, cpu_flags

AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


def test_generic_kernels_on_an_avx512_processor_get_skylakex():
    assert core_type("Prescott", AVX512) == "SkylakeX"
    assert core_type("Prescott", {"avx2", "fma", "sse2"}) == "Haswell"


def test_a_known_core_or_an_old_processor_is_left_alone():
    assert core_type("Haswell", AVX512) is None      # OpenBLAS knew the processor
    assert core_type("Zen", AVX512) is None
    assert core_type("Prescott", {"sse2", "sse3"}) is None  # nothing better to pick


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f\nbugs\t: x\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "fma", "avx512f"}
    assert cpu_flags(str(tmp_path / "missing")) == set()
