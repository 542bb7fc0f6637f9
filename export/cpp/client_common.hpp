// What mtcmkd_segment (main.cpp, TorchScript) and mtcmkd_segment_aoti (aoti_main.cpp) share:
// their command line, the weights digest of mtcmkd/integrity.py, small string helpers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <map>
#include <new>
#include <string>
#include <vector>

#include "nifti.hpp"
#include "sha256.hpp"

namespace client {

// dtype names as Python prints them without "torch." (the digest's definition).
inline std::string dtype_name(c10::ScalarType type) {
  switch (type) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kByte: return "uint8";
    case c10::kChar: return "int8";
    case c10::kShort: return "int16";
    case c10::kInt: return "int32";
    case c10::kLong: return "int64";
    case c10::kBool: return "bool";
    default: return c10::toString(type);
  }
}

// The weights digest of mtcmkd/integrity.py: SHA-256 over the tensors sorted by name, each as
// name, NUL, dtype, NUL, comma-joined shape, NUL, raw bytes.
inline std::string tensors_digest(const std::map<std::string, at::Tensor>& state) {
  sha256::Hasher hasher;
  const char nul = '\0';
  for (const auto& [name, value] : state) {
    const at::Tensor t = value.detach().to(at::kCPU).contiguous();
    hasher.update(name);
    hasher.update(&nul, 1);
    hasher.update(dtype_name(t.scalar_type()));
    hasher.update(&nul, 1);
    std::string shape;
    for (std::int64_t i = 0; i < t.dim(); ++i) {
      if (i > 0) shape += ",";
      shape += std::to_string(t.size(i));
    }
    hasher.update(shape);
    hasher.update(&nul, 1);
    hasher.update(t.data_ptr(), t.nbytes());
  }
  return hasher.hex();
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The command line both programs take: three positional paths and the options below.
struct Args {
  std::vector<std::string> positional;
  int threads = 0;  // 0: libtorch's default
  std::int64_t max_voxels = nifti::kMaxVoxels;
  bool quiet = false;
  bool help = false;
};

// Fills `args`; returns "" or the usage error (the first one met). Stops at -h/--help.
inline std::string parse_args(int argc, char** argv, Args& args) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads") {
      if (i + 1 >= argc) return "--threads needs a value";
      args.threads = std::atoi(argv[++i]);
      if (args.threads < 1) return "--threads must be >= 1";
    } else if (arg == "--max-voxels") {
      if (i + 1 >= argc) return "--max-voxels needs a value";
      char* end = nullptr;
      args.max_voxels = std::strtoll(argv[++i], &end, 10);
      if (end == argv[i] || *end != '\0' || args.max_voxels < 1) {
        return "--max-voxels must be a positive integer";
      }
    } else if (arg == "--quiet") {
      args.quiet = true;
    } else if (arg == "-h" || arg == "--help") {
      args.help = true;
      return "";
    } else if (!arg.empty() && arg[0] == '-') {
      return "unknown option " + arg;
    } else {
      args.positional.push_back(arg);
    }
  }
  if (args.positional.size() == 3 && !ends_with(args.positional[2], ".nii") &&
      !ends_with(args.positional[2], ".nii.gz")) {
    return "OUTPUT must end in .nii or .nii.gz";
  }
  return "";
}

// The line a successful run prints: the output, its size and release, the times and the
// voxels per label value.
inline void print_written(const std::string& output_path, const nifti::Volume& volume,
                          const std::string& convention, double seconds, double cpu_seconds,
                          const std::vector<std::uint8_t>& labels) {
  std::size_t counts[256] = {0};
  for (std::uint8_t v : labels) ++counts[v];
  std::cout << "wrote " << output_path << " (" << volume.nx << "x" << volume.ny << "x"
            << volume.nz << ", labels " << convention << ", " << seconds << " s, cpu "
            << cpu_seconds << " s)";
  for (int v = 0; v < 256; ++v) {
    if (counts[v]) std::cout << " " << v << ":" << counts[v];
  }
  std::cout << "\n";
}

// main() of both programs: whatever escapes `run`'s guarded calls (std::bad_alloc, a libtorch
// error elsewhere) is still one `error:` line (`message` shortens it) and exit code 1, never
// std::terminate's abort.
template <class Run, class Message>
int guarded_main(Run run, Message message, int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::bad_alloc&) {
    std::cerr << "error: not enough memory\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << message(e.what()) << "\n";
  } catch (...) {
    std::cerr << "error: unexpected failure\n";
  }
  return 1;
}

}  // namespace client
