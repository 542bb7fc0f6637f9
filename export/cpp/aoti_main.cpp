// mtcmkd_segment_aoti: segment one NIfTI volume with an AOTInductor package written by
// `mtcmkd export aoti`, without Python.
//
//   mtcmkd_segment_aoti PACKAGE.pt2 INPUT.nii[.gz] OUTPUT.nii[.gz] [--threads N] [--quiet]
//                       [--max-voxels N]
//
// The package carries the whole inference (brain box, z-score, sliding window, label values)
// compiled ahead of time; this program moves voxels between NIfTI files and the package, as
// mtcmkd_segment (main.cpp) does for the TorchScript file: read the student's modality as
// float32 with scl_slope/scl_inter applied, run the package on (1, 1, X, Y, Z) in the file's
// voxel order, write the uint8 labels with the input's header. Before running, the weights
// digest recorded at export (archive entry `extra/weights_sha256`) is recomputed from the
// tensors the compiled model holds. Exit codes: 0 done, 1 the package refused the input (e.g. all
// zero), 2 bad arguments or unreadable files. Every error is one `error:` line on stderr.
#include <ATen/Parallel.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <iostream>
#include <map>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "client_common.hpp"
#include "nifti.hpp"

namespace {

constexpr const char* kMetadataFile = "mtcmkd.json";
constexpr const char* kDigestRecord = "extra/weights_sha256";  // export/aoti.py DIGEST_RECORD
constexpr const char* kFormat = "\"format\": \"mtcmkd-aoti\"";


// mtcmkd/integrity.py's weights digest over the tensors the compiled model holds, by their
// original names (export/aoti.py: package_digest): sorted by name, each fed as name, NUL,
// dtype, NUL, comma-joined shape, NUL, raw bytes.
std::string weights_digest(const std::unordered_map<std::string, at::Tensor>& constants) {
  return client::tensors_digest(std::map<std::string, at::Tensor>(constants.begin(),
                                                                   constants.end()));
}

int usage(const char* message) {
  std::cerr << "error: " << message << "\n"
            << "usage: mtcmkd_segment_aoti PACKAGE.pt2 INPUT.nii[.gz] OUTPUT.nii[.gz] "
               "[--threads N] [--quiet] [--max-voxels N]\n";
  return 2;
}

// Errors raised inside the package (torch._assert_async) arrive as c10::Error whose message
// may span lines; users need its first meaningful line.
std::string first_line(const std::string& what) {
  std::size_t start = 0;
  while (start < what.size()) {
    std::size_t end = what.find('\n', start);
    if (end == std::string::npos) end = what.size();
    std::string line = what.substr(start, end - start);
    const std::size_t first = line.find_first_not_of(" \t");
    if (first != std::string::npos) return line.substr(first);
    start = end + 1;
  }
  return what;
}


// "label_convention": "2021" -> 2021, for the summary line (a tiny JSON lookup: the value is a
// plain string written by json.dumps).
std::string json_string(const std::string& json, const std::string& key) {
  const std::string marker = "\"" + key + "\": \"";
  const std::size_t at = json.find(marker);
  if (at == std::string::npos) return "?";
  const std::size_t begin = at + marker.size();
  const std::size_t end = json.find('"', begin);
  return end == std::string::npos ? "?" : json.substr(begin, end - begin);
}

}  // namespace

static int run(int argc, char** argv) {
  client::Args args;
  const std::string bad = client::parse_args(argc, argv, args);
  if (!bad.empty()) return usage(bad.c_str());
  if (args.help) {
    usage("segment one volume");
    return 0;
  }
  if (args.positional.size() != 3) return usage("expected PACKAGE INPUT OUTPUT");
  const int threads = args.threads;
  const std::int64_t max_voxels = args.max_voxels;
  const bool quiet = args.quiet;
  const std::string& package_path = args.positional[0];
  const std::string& input_path = args.positional[1];
  const std::string& output_path = args.positional[2];
  if (threads > 0) at::set_num_threads(threads);

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::string convention = "?";
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package_path);
    auto metadata = loader->get_metadata();
    const std::string json = metadata.count(kMetadataFile) ? metadata[kMetadataFile] : "";
    if (json.find(kFormat) == std::string::npos) {
      std::cerr << "error: " << package_path
                << ": no mtcmkd metadata; export it with `mtcmkd export aoti`\n";
      return 2;
    }
    convention = json_string(json, "label_convention");
    // Bytes flipped inside the compiled weights load silently; the digest catches them.
    std::string recorded;
    caffe2::serialize::PyTorchStreamReader archive(package_path);
    if (archive.hasRecord(kDigestRecord)) {
      auto [data, size] = archive.getRecord(kDigestRecord);
      recorded.assign(static_cast<const char*>(data.get()), size);
    }
    if (recorded.empty()) {
      if (!quiet) {
        std::cerr << "warning: " << package_path << ": no weights digest; loaded unverified\n";
      }
    } else if (weights_digest(loader->get_runner()->extract_constants_map(false)) != recorded) {
      std::cerr << "error: " << package_path << ": weights do not match the digest recorded at "
                << "export (the file is damaged); export it again\n";
      return 2;
    }
  } catch (const c10::Error& e) {
    std::cerr << "error: " << package_path << ": cannot load the package ("
              << first_line(e.what_without_backtrace()) << ")\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << package_path << ": cannot load the package ("
              << first_line(e.what()) << ")\n";
    return 2;
  }

  nifti::Volume volume;
  try {
    volume = nifti::read(input_path, max_voxels);
  } catch (const nifti::NiftiError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "error: " << input_path << ": not enough memory to read the volume\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << input_path << ": " << first_line(e.what()) << "\n";
    return 2;
  }

  const auto start = std::chrono::steady_clock::now();
  const std::clock_t cpu_start = std::clock();  // process CPU time, all threads (Linux)
  std::vector<std::uint8_t> labels;
  try {
    c10::InferenceMode guard;
    // The file stores x fastest: as a C-order tensor that is (Z, Y, X); permuting gives the
    // (X, Y, Z) array nibabel returns, which is what the package was verified on.
    torch::Tensor zyx = torch::from_blob(volume.voxels.data(), {volume.nz, volume.ny, volume.nx},
                                         torch::kFloat32);
    torch::Tensor x = zyx.permute({2, 1, 0}).contiguous().view(
        {1, 1, volume.nx, volume.ny, volume.nz});
    // AOTInductor's runtime prints "Error: <reason>" on std::cerr before it throws; hold that
    // back so a refused input stays one `error:` line (printed below), and pass anything
    // printed by a successful run through.
    std::ostringstream held;
    std::streambuf* previous = std::cerr.rdbuf(held.rdbuf());
    std::vector<torch::Tensor> outputs;
    try {
      outputs = loader->run({x});
    } catch (...) {
      std::cerr.rdbuf(previous);
      throw;
    }
    std::cerr.rdbuf(previous);
    std::cerr << held.str();
    if (outputs.size() != 1 || outputs[0].scalar_type() != torch::kUInt8 ||
        outputs[0].dim() != 4 || outputs[0].size(1) != volume.nx ||
        outputs[0].size(2) != volume.ny || outputs[0].size(3) != volume.nz) {
      std::cerr << "error: " << package_path << ": unexpected output\n";
      return 1;
    }
    torch::Tensor file_order = outputs[0][0].permute({2, 1, 0}).contiguous();
    const std::uint8_t* data = file_order.data_ptr<std::uint8_t>();
    labels.assign(data, data + file_order.numel());
  } catch (const c10::Error& e) {
    std::cerr << "error: " << input_path << ": " << first_line(e.what_without_backtrace())
              << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << input_path << ": " << first_line(e.what()) << "\n";
    return 1;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double cpu_seconds = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;

  try {
    nifti::write_labels(output_path, volume, labels);
  } catch (const nifti::NiftiError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << output_path << ": " << first_line(e.what()) << "\n";
    return 2;
  }
  if (!quiet) {
    client::print_written(output_path, volume, convention, seconds, cpu_seconds, labels);
  }
  return 0;
}

int main(int argc, char** argv) {
  const auto message = [](const std::string& what) { return first_line(what); };
  return client::guarded_main(run, message, argc, argv);
}
