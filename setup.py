"""Build of the optional compiled kernel; the metadata lives in pyproject.toml.

The extension is optional: if it does not compile (no C compiler, an exotic
platform), the package still installs and layerdiff uses its numpy kernel.
Never -march=native: the module carries its own AVX-512/AVX2/baseline
variants and picks one at import, so a wheel runs on any CPU of its platform.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":  # gcc or clang; MSVC keeps its defaults
            for ext in self.extensions:
                # -O3: the loops are written for the auto-vectoriser (some
                # Pythons build extensions at -O2, which vectorises less).
                ext.extra_compile_args += ["-O3", "-std=gnu11", "-Wno-psabi"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "layerdiff.engine._ckernel",
            sources=["layerdiff/engine/_ckernel.c"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
