// The key table of docs/RECIPES.md is generated from the field tables (recipe_keys_markdown):
// this test fails when the page and the code disagree. TESSERA_UPDATE_DOCS=1 rewrites the table
// between its markers instead (then review and commit the page).
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "config/recipe.h"
#include "tests/common/files.h"

namespace tessera {
namespace {

constexpr const char* kBegin =
    "<!-- recipe-keys:begin (generated from src/config; see tests/config/recipe_docs_test.cpp) "
    "-->\n";
constexpr const char* kEnd = "<!-- recipe-keys:end -->\n";

TEST(RecipeDocs, KeyTableMatchesTheFieldTables) {
  const std::string path = testing::source_path("docs/RECIPES.md");
  std::string page = testing::read_all(path);
  const size_t begin = page.find(kBegin), end = page.find(kEnd);
  ASSERT_NE(begin, std::string::npos) << path << " lacks the line " << kBegin;
  ASSERT_NE(end, std::string::npos) << path << " lacks the line " << kEnd;
  ASSERT_LT(begin, end);
  const size_t from = begin + std::string(kBegin).size();
  const std::string table = recipe_keys_markdown();
  const char* update = std::getenv("TESSERA_UPDATE_DOCS");
  if (update && std::string(update) == "1") {
    page.replace(from, end - from, table);
    testing::write_all(path, page);
    return;
  }
  EXPECT_EQ(page.substr(from, end - from), table)
      << path << " is out of date: run TESSERA_UPDATE_DOCS=1 " << ::testing::internal::GetArgvs()[0]
      << " --gtest_filter=RecipeDocs.*";
}

TEST(RecipeDocs, EveryFieldHasADocLineAndEveryEnumItsNames) {
  const std::string table = recipe_keys_markdown();
  for (const char* key : {"`model.family`", "`precision.loss_scale.hysteresis`",
                          "`precision.grad_reduce`", "`data.path`", "`logging.profile_ops`"})
    EXPECT_NE(table.find(key), std::string::npos) << key << " missing from\n" << table;
  EXPECT_NE(table.find("gpipe \\| 1f1b"), std::string::npos) << table;
  EXPECT_EQ(table.find("|  |\n"), std::string::npos) << "an empty doc cell in\n" << table;
}

}  // namespace
}  // namespace tessera
