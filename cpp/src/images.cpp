#include "images.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "llama4rt.hpp"

namespace llama4rt {
namespace {

// A scale as the reference computes it: float32 when a limit came from the canvas (an int64 tensor element there),
// float64 when it came from the image or the tile (Python ints). NumPy 2 compares and multiplies a float32 with a
// Python float or int in float32.
struct Scale {
  double value;
  bool f32;
};

bool less(Scale a, Scale b) {
  if (a.f32 || b.f32) return static_cast<float>(a.value) < static_cast<float>(b.value);
  return a.value < b.value;
}

int64_t floor_times(int64_t n, Scale s) {
  if (s.f32) return static_cast<int64_t>(std::floor(static_cast<float>(n) * static_cast<float>(s.value)));
  return static_cast<int64_t>(std::floor(static_cast<double>(n) * s.value));
}

// supported_grids: every (rows, cols) with rows·cols ≤ max_patches, grouped by aspect ratio in the order each ratio
// first appears going from max_patches tiles down to 1, each tile count's factor pairs by ascending rows.
std::vector<std::pair<int64_t, int64_t>> supported_grids(int64_t max_patches) {
  std::vector<std::pair<double, std::vector<std::pair<int64_t, int64_t>>>> by_ratio;
  for (int64_t tiles = max_patches; tiles >= 1; --tiles) {
    for (int64_t rows = 1; rows <= tiles; ++rows) {
      if (tiles % rows) continue;
      const double ratio = static_cast<double>(rows) / static_cast<double>(tiles / rows);
      auto group = std::find_if(by_ratio.begin(), by_ratio.end(), [&](const auto& g) { return g.first == ratio; });
      if (group == by_ratio.end()) group = by_ratio.insert(by_ratio.end(), {ratio, {}});
      group->second.push_back({rows, tiles / rows});
    }
  }
  std::vector<std::pair<int64_t, int64_t>> grids;
  for (const auto& group : by_ratio) grids.insert(grids.end(), group.second.begin(), group.second.end());
  return grids;
}

// best_grid: the smallest scale ≥ 1 (the largest with resize_to_max_canvas), else the largest below 1; ties to the
// smallest canvas, then the first.
std::pair<int64_t, int64_t> best_grid(int64_t height, int64_t width, int64_t tile, bool resize_to_max_canvas,
                                      const std::vector<std::pair<int64_t, int64_t>>& grids) {
  const float h = static_cast<float>(height), w = static_cast<float>(width);
  std::vector<float> scales;
  for (const auto& [rows, cols] : grids)
    scales.push_back(std::min(static_cast<float>(rows * tile) / h, static_cast<float>(cols * tile) / w));
  bool growing = false;
  float chosen = 0;
  for (float s : scales)
    if (s >= 1 && (!growing || (resize_to_max_canvas ? s > chosen : s < chosen))) chosen = s, growing = true;
  if (!growing) chosen = *std::max_element(scales.begin(), scales.end());
  std::pair<int64_t, int64_t> best{0, 0};
  for (size_t i = 0; i < grids.size(); ++i)
    if (scales[i] == chosen && (best.first == 0 || grids[i].first * grids[i].second < best.first * best.second))
      best = grids[i];
  return best;
}

// fit_without_distortion: (height, width) inside the canvas keeping the aspect ratio; without resize_to_max_canvas no
// side grows past max(its own length, one tile).
std::pair<int64_t, int64_t> fit_without_distortion(int64_t h, int64_t w, int64_t canvas_h, int64_t canvas_w,
                                                   int64_t tile, bool resize_to_max_canvas) {
  auto limit = [&](int64_t own, int64_t canvas_side, bool& from_canvas) {
    const int64_t grown = std::max(own, tile);
    from_canvas = resize_to_max_canvas || canvas_side < grown;
    return from_canvas ? canvas_side : grown;
  };
  auto scale = [](int64_t target, int64_t own, bool from_canvas) {
    return from_canvas ? Scale{static_cast<float>(target) / static_cast<float>(own), true}
                       : Scale{static_cast<double>(target) / static_cast<double>(own), false};
  };
  bool canvas_h_limit = false, canvas_w_limit = false;
  const int64_t target_h = limit(h, canvas_h, canvas_h_limit), target_w = limit(w, canvas_w, canvas_w_limit);
  const Scale scale_h = scale(target_h, h, canvas_h_limit), scale_w = scale(target_w, w, canvas_w_limit);
  int64_t height, width;
  if (less(scale_w, scale_h)) {
    height = std::min(floor_times(h, scale_w), target_h);
    width = target_w;
  } else {
    height = target_h;
    width = std::min(floor_times(w, scale_h), target_w);
  }
  return {std::max<int64_t>(height, 1), std::max<int64_t>(width, 1)};
}

// uint8 [H, W, 3] pixels, row-major.
struct Pixels {
  int64_t height = 0, width = 0;
  std::vector<uint8_t> data;
  uint8_t at(int64_t y, int64_t x, int c) const { return data[(y * width + x) * 3 + c]; }
};

// _resample_axis: torch's native uint8 antialiased bilinear along one axis (Pillow's filter and support; weights
// normalized in float64, then fixed point at the most bits an int16 holds for the largest weight), rounded to uint8.
Pixels resample_axis(const Pixels& in, bool along_width, int64_t out_size) {
  const int64_t in_size = along_width ? in.width : in.height;
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double support = scale >= 1.0 ? scale : 1.0;
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  const int64_t taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  std::vector<int64_t> first(out_size);
  std::vector<double> weights(out_size * taps);
  double largest = 0;
  for (int64_t i = 0; i < out_size; ++i) {
    const double center = scale * (static_cast<double>(i) + 0.5);
    first[i] = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);  // truncation, as astype
    const int64_t count = std::clamp<int64_t>(
        std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in_size) - first[i], 0, taps);
    double total = 0.0;
    for (int64_t k = 0; k < taps; ++k) {
      const double distance =
          std::fabs((static_cast<double>(k + first[i]) - center + 0.5) * invscale);
      const double weight = distance < 1.0 && k < count ? 1.0 - distance : 0.0;
      weights[i * taps + k] = weight;
      total = total + weight;  // in tap order, as the reference sums
    }
    if (total != 0)
      for (int64_t k = 0; k < taps; ++k) weights[i * taps + k] /= total;
    for (int64_t k = 0; k < taps; ++k) largest = std::max(largest, weights[i * taps + k]);
  }
  int precision = 0;
  while (precision < 22 && static_cast<int64_t>(0.5 + largest * static_cast<double>(int64_t{1} << (precision + 1))) <
                               (int64_t{1} << 15))
    ++precision;
  std::vector<int32_t> fixed(weights.size());
  for (size_t j = 0; j < weights.size(); ++j)
    fixed[j] = static_cast<int32_t>(0.5 + weights[j] * static_cast<double>(int64_t{1} << precision));

  Pixels out;
  out.height = along_width ? in.height : out_size;
  out.width = along_width ? out_size : in.width;
  out.data.resize(out.height * out.width * 3);
  for (int64_t y = 0; y < out.height; ++y) {
    for (int64_t x = 0; x < out.width; ++x) {
      const int64_t i = along_width ? x : y;
      for (int c = 0; c < 3; ++c) {
        int32_t sum = int32_t{1} << (precision - 1);
        for (int64_t k = 0; k < taps; ++k) {
          const int64_t source = std::min(first[i] + k, in_size - 1);
          sum += static_cast<int32_t>(along_width ? in.at(y, source, c) : in.at(source, x, c)) * fixed[i * taps + k];
        }
        out.data[(y * out.width + x) * 3 + c] = static_cast<uint8_t>(std::clamp(sum >> precision, 0, 255));
      }
    }
  }
  return out;
}

Pixels resize(const Pixels& pixels, int64_t height, int64_t width) {
  Pixels out = pixels;
  if (out.width != width) out = resample_axis(out, true, width);
  if (out.height != height) out = resample_axis(out, false, height);
  return out;
}

// float32 → the nearest bfloat16 (ties to even), back in float32: ml_dtypes' rounding.
float bf16_round(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  bits &= 0xFFFF0000u;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// ImageProcessor.normalize: rescaled and normalized as the reference does, each step in float32 rounded to bfloat16.
void normalize(const uint8_t* tile_hwc, int64_t row_stride, int64_t size, const ProcessorConfig& config, float* out) {
  const float rescale = static_cast<float>(config.rescale_factor);
  for (int c = 0; c < 3; ++c) {
    const float mean = bf16_round(static_cast<float>(config.image_mean[c]));
    const float std_ = bf16_round(static_cast<float>(config.image_std[c]));
    for (int64_t y = 0; y < size; ++y) {
      for (int64_t x = 0; x < size; ++x) {
        const float p = static_cast<float>(tile_hwc[y * row_stride + x * 3 + c]);
        float v;
        if (!config.do_rescale)
          v = p;
        else if (!config.do_normalize)
          v = p * rescale;
        else
          v = bf16_round(bf16_round(bf16_round(p * rescale) - mean) / std_);
        out[(c * size + y) * size + x] = v;
      }
    }
  }
}

}  // namespace

Tiles preprocess(const Image& image, const ProcessorConfig& config) {
  // divided rather than multiplied: width x height x 3 of a caller's sizes can wrap to the buffer's length
  const size_t pixel_count = image.rgb.size() / 3;
  if (image.width < 1 || image.height < 1 || image.rgb.size() % 3 != 0 ||
      pixel_count % static_cast<size_t>(image.width) != 0 ||
      pixel_count / static_cast<size_t>(image.width) != static_cast<size_t>(image.height))
    throw Error("an image of " + std::to_string(image.width) + " x " + std::to_string(image.height) + " px with " +
                std::to_string(image.rgb.size()) + " bytes; give width x height x 3 bytes of RGB");
  const int64_t size = config.size;
  const auto [rows, cols] = best_grid(image.height, image.width, size, config.resize_to_max_canvas,
                                      supported_grids(config.max_patches));
  const auto [height, width] = fit_without_distortion(image.height, image.width, rows * size, cols * size, size,
                                                      config.resize_to_max_canvas);
  const Pixels pixels{image.height, image.width, image.rgb};
  const Pixels resized = resize(pixels, height, width);
  const int64_t canvas_w = cols * size;
  std::vector<uint8_t> canvas(rows * size * canvas_w * 3, 0);  // padded right and bottom with black
  for (int64_t y = 0; y < height; ++y)
    std::memcpy(&canvas[y * canvas_w * 3], &resized.data[y * width * 3], width * 3);

  Tiles tiles;
  tiles.grid = {rows, cols};
  tiles.count = rows * cols + (rows * cols > 1 ? 1 : 0);
  const int64_t tile_floats = 3 * size * size;
  tiles.pixels.resize(tiles.count * tile_floats);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      normalize(&canvas[(r * size * canvas_w + c * size) * 3], canvas_w * 3, size, config,
                &tiles.pixels[(r * cols + c) * tile_floats]);
  if (rows * cols > 1) {  // the global tile: the whole image resized (distorted) to one tile
    const Pixels global = resize(pixels, size, size);
    normalize(global.data.data(), size * 3, size, config, &tiles.pixels[rows * cols * tile_floats]);
  }
  return tiles;
}

std::string expand_prompt(const std::string& text, const std::vector<std::pair<int64_t, int64_t>>& grids,
                          const ProcessorConfig& config) {
  const std::string& placeholder = config.placeholder;
  // typed beside images, an image's own tokens would take feature rows none of them gives (runtime/images.py)
  for (const char* token : {"<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                            "<|tile_y_separator|>"})
    if (text.find(token) != std::string::npos)
      throw Error(std::string("the prompt text holds ") + token + " itself; only the image processor writes an "
                  "image's tokens: mark each image with " + placeholder + " alone");
  int64_t found = 0;
  for (size_t at = text.find(placeholder); at != std::string::npos; at = text.find(placeholder, at + placeholder.size()))
    ++found;
  if (found != static_cast<int64_t>(grids.size()))
    throw Error("the prompt has " + std::to_string(found) + " " + placeholder + " placeholder(s) but " +
                std::to_string(grids.size()) + " image(s) were given; put one " + placeholder +
                " where each image goes, in order");
  std::string patches;
  for (int64_t i = 0; i < config.tokens_per_tile; ++i) patches += "<|patch|>";
  std::string out;
  size_t from = 0;
  for (const auto& [rows, cols] : grids) {
    const size_t at = text.find(placeholder, from);
    out += text.substr(from, at - from) + "<|image_start|>";
    if (rows * cols > 1) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) out += (c ? "<|tile_x_separator|>" : "") + patches;
        out += "<|tile_y_separator|>";
      }
    }
    out += "<|image|>" + patches + "<|image_end|>";
    from = at + placeholder.size();
  }
  return out + text.substr(from);
}

}  // namespace llama4rt
