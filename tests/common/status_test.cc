#include "common/status.h"

#include <catch2/catch.hpp>

#include "common/unique_fd.h"

namespace kiln {
namespace {

StatusOr<int> Half(int x) {
  if (x % 2) return InvalidArgumentError(std::to_string(x) + " is odd");
  return x / 2;
}

StatusOr<int> Quarter(int x) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

Status Check(int x) {
  RETURN_IF_ERROR(Quarter(x).status());
  return Status::Ok();
}

TEST_CASE("StatusOr carries a value or an error", "[status]") {
  REQUIRE(Quarter(8).ok());
  CHECK(*Quarter(8) == 2);
  StatusOr<int> bad = Quarter(6);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == StatusCode::kInvalidArgument);
  CHECK(bad.status().message() == "3 is odd");
  CHECK(bad.status().ToString() == "INVALID_ARGUMENT: 3 is odd");
}

TEST_CASE("RETURN_IF_ERROR stops at the first error", "[status]") {
  CHECK(Check(4).ok());
  CHECK(Check(5).message() == "5 is odd");
  CHECK(Status().ToString() == "OK");
}

TEST_CASE("WithContext prefixes the message and keeps the code", "[status]") {
  Status s = NotFoundError("no such file").WithContext("web.yaml");
  CHECK(s.code() == StatusCode::kNotFound);
  CHECK(s.message() == "web.yaml: no such file");
  CHECK(Status::Ok().WithContext("x").ok());
}

TEST_CASE("ErrnoError maps errno to a code and names the cause", "[status]") {
  CHECK(ErrnoError(ENOENT, "open a").code() == StatusCode::kNotFound);
  CHECK(ErrnoError(ENOSPC, "write a").code() == StatusCode::kResourceExhausted);
  CHECK(ErrnoError(EACCES, "open a").message() == "open a: Permission denied");
}

}  // namespace
}  // namespace kiln
