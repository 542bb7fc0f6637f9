// NIfTI-1 reading and writing; see nifti.hpp. Field offsets are those of the NIfTI-1 standard
// (nifti1.h): sizeof_hdr 0, dim 40, datatype 70, bitpix 72, vox_offset 108, scl_slope 112,
// scl_inter 116, cal_max 124, cal_min 128, magic 344.
#include "nifti.hpp"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>

namespace nifti {
namespace {

constexpr int kSizeofHdr = 0;
constexpr int kDim = 40;
constexpr int kDatatype = 70;
constexpr int kBitpix = 72;
constexpr int kVoxOffset = 108;
constexpr int kSclSlope = 112;
constexpr int kSclInter = 116;
constexpr int kCalMax = 124;
constexpr int kCalMin = 128;
constexpr int kMagic = 344;
constexpr int kHeaderSize = 348;
constexpr int kDataOffset = 352;  // header + 4-byte extension flag
constexpr std::int64_t kMaxVoxOffset = std::int64_t{1} << 30;  // nifti_header.MAX_VOX_OFFSET

template <typename T>
T swap_bytes(T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  std::reverse(bytes, bytes + sizeof(T));
  std::memcpy(&value, bytes, sizeof(T));
  return value;
}

template <typename T>
T get(const std::array<char, 348>& header, int offset, bool swapped) {
  T value;
  std::memcpy(&value, header.data() + offset, sizeof(T));
  return swapped ? swap_bytes(value) : value;
}

template <typename T>
void put(std::array<char, 348>& header, int offset, T value, bool swapped) {
  if (swapped) value = swap_bytes(value);
  std::memcpy(header.data() + offset, &value, sizeof(T));
}

// Reads exactly `size` bytes; gzread passes plain files through unchanged.
void read_exact(gzFile file, void* out, std::size_t size, const std::string& path,
                const char* what) {
  char* dst = static_cast<char*>(out);
  while (size > 0) {
    const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(size, 1u << 30));
    const int got = gzread(file, dst, chunk);
    if (got <= 0) {
      throw NiftiError(path + ": file ends inside the " + what + " (truncated?)");
    }
    dst += got;
    size -= static_cast<std::size_t>(got);
  }
}

// Skips `size` bytes (header extensions) through a small buffer: a corrupt vox_offset must not
// size an allocation.
void skip_exact(gzFile file, std::size_t size, const std::string& path) {
  char buffer[1 << 16];
  while (size > 0) {
    const std::size_t chunk = std::min(size, sizeof(buffer));
    read_exact(file, buffer, chunk, path, "header extensions");
    size -= chunk;
  }
}

// Reads the `size` bytes of voxel data, growing the buffer as data arrive (at most doubling),
// so a truncated file whose header claims gigabytes fails after allocating about what it
// holds; a complete file ends in one buffer of exactly `size` bytes.
std::vector<char> read_growing(gzFile file, std::size_t size, const std::string& path,
                               const std::string& declared) {
  constexpr std::size_t kFirst = std::size_t{1} << 24;
  std::vector<char> raw;
  raw.reserve(std::min(size, kFirst));
  std::size_t done = 0;
  while (done < size) {
    if (done == raw.capacity()) raw.reserve(std::min(size, std::max(kFirst, 2 * done)));
    const std::size_t want = std::min<std::size_t>(raw.capacity() - done, 1u << 30);
    raw.resize(done + want);
    const int got = gzread(file, raw.data() + done, static_cast<unsigned>(want));
    if (got <= 0) {
      throw NiftiError(path + ": file ends inside the voxel data (truncated?): the header "
                       "declares " + declared + ", " + std::to_string(size) + " bytes, the "
                       "file holds " + std::to_string(done));
    }
    done += static_cast<std::size_t>(got);
    raw.resize(done);
  }
  return raw;
}

template <typename T>
void convert(const std::vector<char>& raw, bool swapped, std::vector<float>& out, double slope,
             double inter, bool scale) {
  const std::size_t n = out.size();
  for (std::size_t i = 0; i < n; ++i) {
    T value;
    std::memcpy(&value, raw.data() + i * sizeof(T), sizeof(T));
    if (swapped) value = swap_bytes(value);
    // Scaling in double, then one rounding to float: the same arithmetic as nibabel's
    // get_fdata() followed by a cast to float32.
    const double v = static_cast<double>(value);
    out[i] = static_cast<float>(scale ? v * slope + inter : v);
  }
}

struct GzCloser {
  void operator()(gzFile f) const {
    if (f) gzclose(f);
  }
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Volume read(const std::string& path, std::int64_t max_voxels) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (!file) throw NiftiError(path + ": cannot open (no such file or no permission)");
  std::unique_ptr<gzFile_s, GzCloser> guard(file);

  Volume vol;
  read_exact(file, vol.header.data(), kHeaderSize, path, "header");
  const std::int32_t sizeof_hdr = get<std::int32_t>(vol.header, kSizeofHdr, false);
  if (sizeof_hdr == kHeaderSize) {
    vol.swapped = false;
  } else if (swap_bytes(sizeof_hdr) == kHeaderSize) {
    vol.swapped = true;
  } else {
    throw NiftiError(path + ": not a NIfTI-1 file (sizeof_hdr is not 348)");
  }
  const char* magic = vol.header.data() + kMagic;
  if (std::memcmp(magic, "n+1", 4) != 0) {
    if (std::memcmp(magic, "ni1", 4) == 0) {
      throw NiftiError(path + ": two-file NIfTI (.hdr/.img) is not supported; convert to .nii");
    }
    throw NiftiError(path + ": not a NIfTI-1 file (bad magic)");
  }
  const bool s = vol.swapped;
  const std::int16_t ndim = get<std::int16_t>(vol.header, kDim, s);
  if (ndim < 1 || ndim > 7) throw NiftiError(path + ": bad dim[0] " + std::to_string(ndim));
  std::int64_t dims[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  for (int i = 1; i <= ndim; ++i) dims[i] = get<std::int16_t>(vol.header, kDim + 2 * i, s);
  for (int i = 1; i <= ndim; ++i) {
    if (dims[i] < 1) throw NiftiError(path + ": bad dim[" + std::to_string(i) + "]");
  }
  for (int i = 4; i <= ndim; ++i) {
    if (dims[i] != 1) {
      throw NiftiError(path + ": " + std::to_string(ndim) + "D image with " +
                       std::to_string(dims[i]) + " entries in dim[" + std::to_string(i) +
                       "]; the client segments one 3D volume");
    }
  }
  vol.nx = dims[1];
  vol.ny = dims[2];
  vol.nz = dims[3];
  vol.datatype = get<std::int16_t>(vol.header, kDatatype, s);

  std::size_t bytes_per_voxel = 0;
  const char* dtype_name = "";
  switch (vol.datatype) {
    case 2: bytes_per_voxel = 1; dtype_name = "uint8"; break;
    case 256: bytes_per_voxel = 1; dtype_name = "int8"; break;
    case 4: bytes_per_voxel = 2; dtype_name = "int16"; break;
    case 512: bytes_per_voxel = 2; dtype_name = "uint16"; break;
    case 8: bytes_per_voxel = 4; dtype_name = "int32"; break;
    case 16: bytes_per_voxel = 4; dtype_name = "float32"; break;
    case 768: bytes_per_voxel = 4; dtype_name = "uint32"; break;
    case 64: bytes_per_voxel = 8; dtype_name = "float64"; break;
    default:
      throw NiftiError(path + ": unsupported NIfTI datatype " + std::to_string(vol.datatype) +
                       " (supported: uint8, int8, int16, uint16, int32, uint32, float32, "
                       "float64)");
  }

  // Every size is checked before anything is allocated: a corrupt header must fail with a
  // message, not with std::bad_alloc or a multi-GB allocation (the limits of
  // mtcmkd/nifti_header.py).
  const float vox_offset = get<float>(vol.header, kVoxOffset, s);
  if (!std::isfinite(vox_offset) || vox_offset < kHeaderSize ||
      vox_offset > static_cast<float>(kMaxVoxOffset) ||
      vox_offset != std::floor(vox_offset)) {
    char shown[32];
    std::snprintf(shown, sizeof(shown), "%g", static_cast<double>(vox_offset));
    throw NiftiError(path + ": bad vox_offset " + shown +
                     " (not a byte offset in " + std::to_string(kHeaderSize) + ".." +
                     std::to_string(kMaxVoxOffset) + ")");
  }
  const std::string declared = std::to_string(vol.nx) + "x" + std::to_string(vol.ny) + "x" +
                               std::to_string(vol.nz) + " " + dtype_name;
  std::int64_t n_voxels = 0;
  std::size_t n_bytes = 0;
  if (__builtin_mul_overflow(vol.nx, vol.ny, &n_voxels) ||
      __builtin_mul_overflow(n_voxels, vol.nz, &n_voxels) || n_voxels > max_voxels ||
      __builtin_mul_overflow(static_cast<std::size_t>(n_voxels), bytes_per_voxel, &n_bytes)) {
    throw NiftiError(path + ": header declares " + declared + " = " +
                     std::to_string(vol.nx * vol.ny * vol.nz) + " voxels, above the limit of " +
                     std::to_string(max_voxels) + " voxels (--max-voxels)");
  }
  skip_exact(file, static_cast<std::size_t>(vox_offset) - kHeaderSize, path);

  const std::size_t n = static_cast<std::size_t>(n_voxels);
  const std::vector<char> raw = read_growing(file, n_bytes, path, declared);

  // NIfTI: scl_slope 0 (or not finite) means "no scaling"; nibabel treats it the same way.
  const double slope = get<float>(vol.header, kSclSlope, s);
  const double inter = get<float>(vol.header, kSclInter, s);
  const bool scale = slope != 0.0 && std::isfinite(slope);
  if (scale && !std::isfinite(inter)) {
    throw NiftiError(path + ": valid scl_slope but non-finite scl_inter");
  }
  vol.voxels.resize(n);
  switch (vol.datatype) {
    case 2: convert<std::uint8_t>(raw, s, vol.voxels, slope, inter, scale); break;
    case 256: convert<std::int8_t>(raw, s, vol.voxels, slope, inter, scale); break;
    case 4: convert<std::int16_t>(raw, s, vol.voxels, slope, inter, scale); break;
    case 512: convert<std::uint16_t>(raw, s, vol.voxels, slope, inter, scale); break;
    case 8: convert<std::int32_t>(raw, s, vol.voxels, slope, inter, scale); break;
    case 768: convert<std::uint32_t>(raw, s, vol.voxels, slope, inter, scale); break;
    case 16: convert<float>(raw, s, vol.voxels, slope, inter, scale); break;
    case 64: convert<double>(raw, s, vol.voxels, slope, inter, scale); break;
    default: break;  // rejected above
  }
  return vol;
}

void write_labels(const std::string& path, const Volume& reference,
                  const std::vector<std::uint8_t>& labels) {
  const std::size_t n = static_cast<std::size_t>(reference.nx * reference.ny * reference.nz);
  if (labels.size() != n) throw NiftiError(path + ": label count does not match the reference");

  std::array<char, 348> header = reference.header;
  const bool s = reference.swapped;
  const std::int16_t dims[8] = {3, static_cast<std::int16_t>(reference.nx),
                                static_cast<std::int16_t>(reference.ny),
                                static_cast<std::int16_t>(reference.nz), 1, 1, 1, 1};
  for (int i = 0; i < 8; ++i) put<std::int16_t>(header, kDim + 2 * i, dims[i], s);
  put<std::int16_t>(header, kDatatype, 2, s);  // DT_UINT8
  put<std::int16_t>(header, kBitpix, 8, s);
  put<float>(header, kVoxOffset, static_cast<float>(kDataOffset), s);
  put<float>(header, kSclSlope, 1.0f, s);
  put<float>(header, kSclInter, 0.0f, s);
  put<float>(header, kCalMax, 0.0f, s);
  put<float>(header, kCalMin, 0.0f, s);
  std::memcpy(header.data() + kMagic, "n+1", 4);
  const char extension_flag[4] = {0, 0, 0, 0};

  const std::string tmp = path + ".tmp";
  if (ends_with(path, ".gz")) {
    gzFile file = gzopen(tmp.c_str(), "wb6");
    if (!file) throw NiftiError(path + ": cannot write");
    bool ok = gzwrite(file, header.data(), kHeaderSize) == kHeaderSize &&
              gzwrite(file, extension_flag, 4) == 4;
    std::size_t done = 0;
    while (ok && done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - done, 1u << 30));
      ok = gzwrite(file, labels.data() + done, chunk) == static_cast<int>(chunk);
      done += chunk;
    }
    ok = (gzclose(file) == Z_OK) && ok;
    if (!ok) {
      std::remove(tmp.c_str());
      throw NiftiError(path + ": write failed (disk full?)");
    }
  } else {
    std::ofstream out(tmp, std::ios::binary);
    out.write(header.data(), kHeaderSize);
    out.write(extension_flag, 4);
    out.write(reinterpret_cast<const char*>(labels.data()), static_cast<std::streamsize>(n));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw NiftiError(path + ": write failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw NiftiError(path + ": cannot rename the temporary file into place");
  }
}

}  // namespace nifti
