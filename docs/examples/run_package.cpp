// Run a graphquant AOTInductor package from C++: no Python, no graphquant.
//
//   graphquant.save(qmodel, "model.pt2", package="aoti")      (Python, once)
//   ./run_package model.pt2 2 3 16 16                          (here: input shape after the path)
//
// The input is torch::linspace(-2, 2, numel) in that shape, so a caller can rebuild it in Python;
// every value of the first output is printed, one per line, with 9 significant digits (a float32
// read back from that text is the same float32). Build (docs/compiled.md; tests/test_compiled.py
// builds and runs it):
//
//   TORCH=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++20 -O1 run_package.cpp -o run_package -I$TORCH/include \
//       -I$TORCH/include/torch/csrc/api/include -L$TORCH/lib -Wl,-rpath,$TORCH/lib \
//       -ltorch -ltorch_cpu -lc10
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PACKAGE.pt2 SIZE...\n", argv[0]);
    return 2;
  }
  try {
    c10::InferenceMode inference;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<int64_t> shape;
    int64_t numel = 1;
    for (int i = 2; i < argc; ++i) {
      shape.push_back(std::stoll(argv[i]));
      numel *= shape.back();
    }
    at::Tensor x = at::linspace(-2.0, 2.0, numel).reshape(shape);
    std::vector<at::Tensor> outputs = loader.run({x});
    at::Tensor y = outputs.at(0).contiguous().to(at::kFloat);
    const float* data = y.data_ptr<float>();
    for (int64_t i = 0; i < y.numel(); ++i) {
      std::printf("%.9g\n", data[i]);
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());  // a graphquant package's refusal lands here too
    return 1;
  }
  return 0;
}
