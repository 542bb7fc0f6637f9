// Minimal NIfTI-1 single-file reader/writer (.nii and .nii.gz) for the segmentation client.
//
// Only what a 3D scalar MRI volume needs: the 348-byte header, the common voxel datatypes,
// scl_slope/scl_inter, either byte order. Header fields this code does not interpret (affine,
// qform/sform, pixdim, units, descriptions) are carried over byte for byte, so a label map
// written with the input as reference overlays the input in any viewer.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace nifti {

// Thrown for unreadable or unsupported files; the message names the file and the problem.
struct NiftiError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Volume {
  // Raw header in the file's byte order (never normalised, so unknown fields survive).
  std::array<char, 348> header{};
  bool swapped = false;  // file byte order differs from this machine's
  std::int64_t nx = 0, ny = 0, nz = 0;
  std::int16_t datatype = 0;
  // Intensities after scl_slope/scl_inter, x fastest (the file's order), float32.
  std::vector<float> voxels;
};

// Most voxels a header may declare before anything is allocated (mtcmkd/nifti_header.py's
// MAX_VOXELS: 2^31, about 1290^3; a BraTS volume has 9e6).
constexpr std::int64_t kMaxVoxels = std::int64_t{1} << 31;

// Reads a 3D volume (or 4D with one time point). gzip is detected from the content, not the
// name. The header is checked before any allocation: more than `max_voxels` voxels, a
// vox_offset that is not a sane byte offset, or data shorter than declared throw NiftiError.
Volume read(const std::string& path, std::int64_t max_voxels = kMaxVoxels);

// Writes a uint8 label map (x fastest, nx*ny*nz values) with `reference`'s header: datatype
// uint8, bitpix 8, 3D dims, scl_slope 1 / scl_inter 0, cal_min/cal_max 0, no extensions.
// ".gz" in `path` compresses. Written to a temporary name and renamed. Throws NiftiError.
void write_labels(const std::string& path, const Volume& reference,
                  const std::vector<std::uint8_t>& labels);

}  // namespace nifti
