// Llama 4 image preprocessing and prompt expansion, as the Python runtime's llama4_export/runtime/images.py does them
// (which reproduces transformers' Llama4ImageProcessor and Llama4Processor), pixel for pixel: the tile grid, the
// antialiased bilinear resize of uint8 pixels, the bfloat16 rounding of the normalization, the global tile.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace llama4rt {

struct Image;

// The manifest's vision.processor (ImageProcessorConfig.to_dict).
struct ProcessorConfig {
  int64_t size = 0;         // side of one tile
  int64_t max_patches = 0;  // most tiles in the grid (the global tile not counted)
  bool resize_to_max_canvas = false;
  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  double image_mean[3] = {0, 0, 0};
  double image_std[3] = {1, 1, 1};
  int64_t tokens_per_tile = 0;
  std::string placeholder = "<|image|>";
};

struct Tiles {
  std::vector<float> pixels;  // [count, 3, size, size]: the grid's tiles row by row, then the global tile
  int64_t count = 0;
  std::pair<int64_t, int64_t> grid;  // (rows, cols)
};

Tiles preprocess(const Image& image, const ProcessorConfig& config);

// `text` with its k-th placeholder replaced by the k-th grid's tokens (ImageProcessor.expand_prompt).
std::string expand_prompt(const std::string& text, const std::vector<std::pair<int64_t, int64_t>>& grids,
                          const ProcessorConfig& config);

}  // namespace llama4rt
