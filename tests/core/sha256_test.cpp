// SHA-256 against the FIPS 180-2 example vectors, padding-boundary lengths, streaming in awkward
// chunks, and hashing a file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/sha256.h"

namespace tessera {
namespace {

const char kMillionA[] = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";

TEST(Sha256, FipsVectors) {
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), kMillionA);
  EXPECT_EQ(sha256_hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnop"
                       "jklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

TEST(Sha256, PaddingBoundaries) {
  // 55 bytes: length fits the same block; 56..63: padding spills into a second block.
  EXPECT_EQ(sha256_hex(std::string(55, 'a')),
            "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
  EXPECT_EQ(sha256_hex(std::string(63, 'a')),
            "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34");
  EXPECT_EQ(sha256_hex(std::string(64, 'a')),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
  EXPECT_EQ(sha256_hex(std::string(119, 'a')),
            "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb");
  EXPECT_EQ(sha256_hex(std::string(120, 'a')),
            "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c");
}

TEST(Sha256, StreamingMatchesOneShot) {
  const std::string msg(1000000, 'a');
  for (size_t chunk : {1, 7, 63, 64, 65, 4096}) {
    Sha256 h;
    for (size_t off = 0; off < msg.size(); off += chunk)
      h.update(msg.data() + off, std::min(chunk, msg.size() - off));
    EXPECT_EQ(h.hex_digest(), kMillionA) << "chunk " << chunk;
  }
  Sha256 h;  // hex_digest does not finalise: the stream can go on
  h.update("ab", 2);
  EXPECT_EQ(h.hex_digest(), sha256_hex("ab"));
  h.update("c", 1);
  EXPECT_EQ(h.hex_digest(), sha256_hex("abc"));
}

TEST(Sha256, Files) {
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / fmt::format("tessera_sha256_{}.bin", ::getpid());
  {
    std::ofstream out(path, std::ios::binary);
    out << std::string(1000000, 'a');
  }
  EXPECT_EQ(sha256_file_hex(path.string()), kMillionA);
  std::filesystem::remove(path);
  try {
    sha256_file_hex(path.string());
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::user);
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
  EXPECT_THROW(sha256_file_hex(std::filesystem::temp_directory_path().string()), Error);
}

}  // namespace
}  // namespace tessera
