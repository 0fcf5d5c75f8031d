// End of the AVX2 section opened by avx2_prelude.h.
#ifdef NF_CPU_DEFINED_AVX
#undef __AVX__
#undef NF_CPU_DEFINED_AVX
#endif
#ifdef NF_CPU_DEFINED_AVX2
#undef __AVX2__
#undef NF_CPU_DEFINED_AVX2
#endif
#pragma GCC diagnostic pop
#pragma GCC pop_options
