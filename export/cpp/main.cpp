// mtcmkd_segment: segment one NIfTI volume with an exported mtcmkd student, without Python.
//
//   mtcmkd_segment MODULE.pt INPUT.nii[.gz] OUTPUT.nii[.gz] [--threads N] [--quiet]
//                  [--max-voxels N]
//
// MODULE.pt is written by `mtcmkd export torchscript`; it carries the whole inference (brain
// crop, z-score, sliding window, label values), so this program only moves voxels between
// NIfTI files and the module: read the student's modality (e.g. T1ce) as float32 with
// scl_slope/scl_inter applied, call forward() on (1, 1, X, Y, Z) in the file's voxel order,
// write the uint8 label map with the input's header. Exit codes: 0 done, 1 the module failed
// on this input, 2 bad arguments or unreadable files. Every error is one line on stderr,
// `error: <path>: <reason>`; none escapes as an abort. --max-voxels raises the header check's
// voxel limit (default 2^31), which refuses corrupt headers before anything is allocated.
//
// Progress goes to stderr, for logs (SLURM, nohup) as much as terminals: a step that has run
// for 10 s says what it does (`mtcmkd_segment: segmenting IN (240x240x155, labels 2021, 4
// threads): 10 s`), again every 30 s, and its time when it ends; quick steps and quick
// failures print nothing, so an error stays the only line. MTCMKD_SEGMENT_PROGRESS_S=S
// changes the 10 s (0: announce every step at once); --quiet turns progress off.
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client_common.hpp"
#include "nifti.hpp"

namespace {

constexpr const char* kMetadataFile = "mtcmkd.json";
constexpr const char* kDigestFile = "weights_sha256";

// The weights digest of mtcmkd/integrity.py: SHA-256 over the module's parameters and
// buffers sorted by name, each as name, NUL, dtype, NUL, comma-joined shape, NUL, raw bytes.
std::string weights_digest(const torch::jit::Module& module) {
  std::map<std::string, at::Tensor> state;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) state[item.name] = item.value;
  for (const auto& item : module.named_buffers(/*recurse=*/true)) state[item.name] = item.value;
  return client::tensors_digest(state);
}

// Progress lines on stderr for the long steps (see the top of the file). A background thread
// wakes a few times a second; it prints only for a step that has lasted `first_s_`, so the
// output of quick runs, and the one-line errors, are unchanged.
class Heartbeat {
 public:
  Heartbeat(bool enabled, double first_s, double every_s)
      : enabled_(enabled), first_s_(first_s), every_s_(every_s) {
    if (enabled_ && first_s_ > 0) worker_ = std::thread([this] { loop(); });
  }
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;
  ~Heartbeat() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

  // A step begins (the previous one, if any, ends first).
  void begin(const std::string& what) {
    end();
    std::lock_guard<std::mutex> lock(mutex_);
    what_ = what;
    start_ = last_ = Clock::now();
    announced_ = false;
    if (enabled_ && first_s_ <= 0) {
      say(what_ + " ...");
      announced_ = true;
    }
  }

  // The step ended: its time, if it was announced.
  void end() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (what_.empty()) return;
    if (announced_) say(what_ + " done in " + seconds_text(since(start_)));
    what_.clear();
  }

 private:
  using Clock = std::chrono::steady_clock;

  static double since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  }
  static std::string seconds_text(double s) {
    std::ostringstream text;
    text << std::fixed << std::setprecision(1) << s << " s";
    return text.str();
  }
  static void say(const std::string& line) { std::cerr << "mtcmkd_segment: " << line << std::endl; }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_) {
      wake_.wait_for(lock, std::chrono::milliseconds(200));
      if (stopping_ || what_.empty()) continue;
      const double running = since(start_);
      if ((!announced_ && running >= first_s_) || (announced_ && since(last_) >= every_s_)) {
        say(what_ + ": " + std::to_string(static_cast<long>(running)) + " s");
        announced_ = true;
        last_ = Clock::now();
      }
    }
  }

  const bool enabled_;
  const double first_s_;
  const double every_s_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread worker_;
  bool stopping_ = false;
  bool announced_ = false;
  std::string what_;
  Clock::time_point start_, last_;
};

// MTCMKD_SEGMENT_PROGRESS_S: seconds before a step is announced (default 10; 0 announces
// every step at once).
double progress_after_seconds() {
  const char* text = std::getenv("MTCMKD_SEGMENT_PROGRESS_S");
  if (text == nullptr || *text == '\0') return 10.0;
  char* end = nullptr;
  const double value = std::strtod(text, &end);
  return (end != text && *end == '\0' && value >= 0) ? value : 10.0;
}

int usage(const char* message) {
  std::cerr << "error: " << message << "\n"
            << "usage: mtcmkd_segment MODULE.pt INPUT.nii[.gz] OUTPUT.nii[.gz] "
               "[--threads N] [--quiet] [--max-voxels N]\n";
  return 2;
}

// TorchScript errors carry an interpreter traceback; users need the raised message only
// (e.g. "ValueError: the image is all zero: no brain voxels to segment").
std::string short_error(const std::string& what) {
  const std::string marker = "Error: ";
  std::size_t best = std::string::npos;
  for (std::size_t pos = what.find(marker); pos != std::string::npos;
       pos = what.find(marker, pos + 1)) {
    best = pos;
  }
  std::size_t start = 0;
  if (best != std::string::npos) {
    start = what.rfind('\n', best);
    start = start == std::string::npos ? 0 : start + 1;
  }
  const std::size_t end = what.find('\n', start);
  std::string line = what.substr(start, end == std::string::npos ? std::string::npos : end - start);
  const std::size_t first = line.find_first_not_of(" \t");
  return first == std::string::npos ? what : line.substr(first);
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
  if (args.positional.size() != 3) return usage("expected MODULE INPUT OUTPUT");
  const int threads = args.threads;
  const std::int64_t max_voxels = args.max_voxels;
  const bool quiet = args.quiet;
  const std::string& module_path = args.positional[0];
  const std::string& input_path = args.positional[1];
  const std::string& output_path = args.positional[2];
  if (threads > 0) at::set_num_threads(threads);
  Heartbeat progress(!quiet, progress_after_seconds(), 30.0);
  progress.begin("loading " + module_path);

  torch::jit::Module module;
  torch::jit::ExtraFilesMap extra{{kMetadataFile, ""}, {kDigestFile, ""}};
  std::string convention = "?";
  std::int64_t n_channels = 1;
  try {
    module = torch::jit::load(module_path, torch::kCPU, extra);
    module.eval();
    if (extra[kMetadataFile].empty()) {
      std::cerr << "error: " << module_path
                << ": no mtcmkd metadata; export it with `mtcmkd export torchscript`\n";
      return 2;
    }
    // Flipped bytes inside a tensor load silently; the digest recorded at export catches them.
    const std::string recorded = extra[kDigestFile];
    if (recorded.empty()) {
      if (!quiet) {
        std::cerr << "warning: " << module_path << ": no weights digest (exported before mtcmkd "
                  << "recorded one); loaded unverified\n";
      }
    } else if (weights_digest(module) != recorded) {
      std::cerr << "error: " << module_path << ": weights do not match the digest recorded at "
                << "export (the file is damaged); export it again\n";
      return 2;
    }
    convention = module.attr("label_convention").toStringRef();
    n_channels = module.attr("n_channels").toInt();
  } catch (const c10::Error& e) {
    std::cerr << "error: " << module_path << ": cannot load the module ("
              << short_error(e.what_without_backtrace()) << ")\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << module_path << ": cannot load the module (" << short_error(e.what())
              << ")\n";
    return 2;
  }
  if (n_channels != 1) {
    std::cerr << "error: " << module_path << ": the module takes " << n_channels
              << " modalities; this client reads one volume\n";
    return 2;
  }

  progress.begin("reading " + input_path);
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
    std::cerr << "error: " << input_path << ": " << short_error(e.what()) << "\n";
    return 2;
  }

  progress.begin("segmenting " + input_path + " (" + std::to_string(volume.nx) + "x" +
                 std::to_string(volume.ny) + "x" + std::to_string(volume.nz) + ", labels " +
                 convention + ", " + std::to_string(at::get_num_threads()) + " threads)");
  const auto start = std::chrono::steady_clock::now();
  const std::clock_t cpu_start = std::clock();  // process CPU time, all threads (Linux)
  std::vector<std::uint8_t> labels;
  try {
    c10::InferenceMode guard;
    // The file stores x fastest: as a C-order tensor that is (Z, Y, X); permuting gives the
    // (X, Y, Z) array nibabel returns, which is what the module was verified on.
    torch::Tensor zyx = torch::from_blob(volume.voxels.data(), {volume.nz, volume.ny, volume.nx},
                                         torch::kFloat32);
    torch::Tensor x = zyx.permute({2, 1, 0}).contiguous().view(
        {1, 1, volume.nx, volume.ny, volume.nz});
    torch::Tensor out = module.forward({x}).toTensor();
    if (out.scalar_type() != torch::kUInt8 || out.dim() != 4 || out.size(1) != volume.nx ||
        out.size(2) != volume.ny || out.size(3) != volume.nz) {
      std::cerr << "error: " << module_path << ": unexpected output " << out.sizes() << "\n";
      return 1;
    }
    torch::Tensor file_order = out[0].permute({2, 1, 0}).contiguous();
    const std::uint8_t* data = file_order.data_ptr<std::uint8_t>();
    labels.assign(data, data + file_order.numel());
  } catch (const c10::Error& e) {
    std::cerr << "error: " << input_path << ": " << short_error(e.what_without_backtrace())
              << "\n";
    return 1;
  } catch (const std::exception& e) {
    // A `raise` inside the scripted module arrives as torch::jit::JITException.
    std::cerr << "error: " << input_path << ": " << short_error(e.what()) << "\n";
    return 1;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double cpu_seconds = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;

  progress.begin("writing " + output_path);
  try {
    nifti::write_labels(output_path, volume, labels);
  } catch (const nifti::NiftiError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << output_path << ": " << short_error(e.what()) << "\n";
    return 2;
  }
  progress.end();
  if (!quiet) {
    client::print_written(output_path, volume, convention, seconds, cpu_seconds, labels);
  }
  return 0;
}

int main(int argc, char** argv) {
  const auto message = [](const std::string& what) { return short_error(what); };
  return client::guarded_main(run, message, argc, argv);
}
