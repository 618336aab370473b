// Tensor views: shapes, slicing, typed access checks.
#include <gtest/gtest.h>

#include "core/tensor.h"

namespace tessera {

TEST(Tensor, ShapeAndViews) {
  float buf[24];
  Tensor t(buf, DType::f32, Device::cpu, {2, 3, 4});
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_EQ(t.dim(-1), 4);
  Tensor s = t.slice(1, 2);
  EXPECT_EQ(s.ptr<float>(), buf + 12);
  EXPECT_EQ(s.shape, Shape({1, 3, 4}));
  EXPECT_EQ(t.view({6, 4}).dim(0), 6);
  EXPECT_THROW(t.view({5, 4}), Error);
  EXPECT_THROW(t.ptr<double>(), Error);
  EXPECT_EQ(t.str(), "fp32 cpu (2, 3, 4)");
}

}  // namespace tessera
