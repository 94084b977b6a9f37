/* Test-only stand-in for Windows' bcryptprimitives.dll under wine 8.0, which lacks ProcessPrng: Rust's standard
   library (in the safetensors, tokenizers and hf_xet wheels) asks it for random bytes at start-up. Real Windows
   (8.1 and later) has it; the bundle does not ship this file. Built by the tests with Debian's mingw-w64. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length); /* RtlGenRandom, advapi32 */

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk)) return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
