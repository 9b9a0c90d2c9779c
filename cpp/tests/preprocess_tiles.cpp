// preprocess-tiles: an artifact's image preprocessing in llama4rt, for tests against the Python runtime's.
//   preprocess-tiles ARTIFACT IMAGE.ppm OUT.f32  → OUT.f32 holds the tiles (float32 [count, 3, size, size]); stdout
//   prints "rows cols count".
#include <fstream>
#include <iostream>
#include <string>

#include "artifact.hpp"
#include "images.hpp"
#include "llama4rt.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: preprocess-tiles ARTIFACT IMAGE.ppm OUT.f32" << std::endl;
    return 2;
  }
  try {
    const llama4rt::Artifact artifact = llama4rt::read_artifact(argv[1]);
    if (!artifact.vision) throw llama4rt::Error(std::string(argv[1]) + ": no vision entry");
    std::ifstream in(argv[2], std::ios::binary);
    std::string magic;
    llama4rt::Image image;
    int maxval = 0;
    in >> magic >> image.width >> image.height >> maxval;
    in.get();
    image.rgb.resize(image.width * image.height * 3);
    in.read(reinterpret_cast<char*>(image.rgb.data()), image.rgb.size());
    if (magic != "P6" || maxval != 255 || !in) throw llama4rt::Error(std::string(argv[2]) + ": not a P6 PPM");
    const llama4rt::Tiles tiles = llama4rt::preprocess(image, artifact.vision->processor);
    std::ofstream out(argv[3], std::ios::binary);
    out.write(reinterpret_cast<const char*>(tiles.pixels.data()), tiles.pixels.size() * sizeof(float));
    std::cout << tiles.grid.first << " " << tiles.grid.second << " " << tiles.count << std::endl;
    return 0;
  } catch (const llama4rt::Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  }
}
