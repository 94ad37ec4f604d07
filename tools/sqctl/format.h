// Human-readable formatting shared by the sqctl commands.
#pragma once

#include <cstdint>
#include <string>

#include "query/eval.h"
#include "sqz/db.h"

namespace sqz::cli {

std::string FormatBytes(uint64_t bytes);    // "1.5 GiB"
std::string FormatSeconds(double seconds);  // "1h02m", "3.2 s", "850 us"
// A context name for line-oriented text output: control characters and
// backslashes escaped (\n, \t, \\, \xNN), so one name stays on one line
// (a name may hold any bytes; --json keeps it exact).
std::string PrintableName(const std::string& name);
std::string ContextInfoText(const ContextInfo& info);
std::string ContextInfoJson(const ContextInfo& info);
// sqctl eval --json: the report as one JSON object.
std::string EvalReportJson(const query::EvalReport& report);

}  // namespace sqz::cli
