// Human-readable formatting shared by the sqctl commands.
#pragma once

#include <cstdint>
#include <string>

#include "query/eval.h"
#include "sqz/db.h"

namespace sqz::cli {

std::string FormatBytes(uint64_t bytes);    // "1.5 GiB"
std::string FormatSeconds(double seconds);  // "1h02m", "3.2 s", "850 us"
std::string ContextInfoText(const ContextInfo& info);
std::string ContextInfoJson(const ContextInfo& info);
// sqctl eval --json: the report as one JSON object.
std::string EvalReportJson(const query::EvalReport& report);

}  // namespace sqz::cli
