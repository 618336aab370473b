// write_teacher_cache: what `tessera distill-cache` does — runs a teacher checkpoint forward over
// training windows of a token dataset, a micro-batch at a time on one device, and writes its
// top-k logits, their ids and its tempered log-sum-exps (ops.h topk_logits) into a teacher cache
// (data/teacher_cache.h) that a recipe's distill.teacher_cache trains from. Not here: reading the
// cache (train_data.h) or the sparse KD loss (model/distill_loss.h).
#pragma once
#include <string>
#include <vector>

#include "config/enums.h"

namespace tessera {

struct DistillCacheOptions {
  std::string teacher;  // a checkpoint step directory or a run directory (its latest)
  std::string data;     // the token dataset (its train split's windows)
  std::string out;      // the cache file to write (atomically)
  int top_k = 32;
  int seq_len = 0;                  // 0: the teacher's max_seq_len (or windows_of's)
  std::vector<float> temperatures;  // empty: {1, 2} (or windows_of's curriculum's)
  TeacherPrecision precision = TeacherPrecision::bf16;
  bool precision_given = false;  // else windows_of's distill.teacher_precision
  int micro_batch = 8;           // windows per teacher forward
  DeviceChoice device = DeviceChoice::auto_;
  // A student recipe (with its --set overrides): only the windows its run trains on, at its
  // data.seq_len and the temperatures its curriculum distils at. Empty: every window.
  std::string windows_of;
  std::vector<std::string> overrides;
};

// Errors: bad options, a teacher or dataset that cannot be read or do not match (user errors
// naming the option and the file), a run of several MPI ranks.
void write_teacher_cache(const DistillCacheOptions& o);

}  // namespace tessera
