#include "git/git_source.h"

#include <algorithm>
#include <cctype>

#include "common/logging.h"
#include "common/sha256.h"
#include "git/libgit2.h"

namespace kiln::git {
namespace fs = std::filesystem;

namespace {

constexpr std::string_view kPrefix = "git+";

// The credentials libgit2 itself can find, tried once each: the ssh-agent at $SSH_AUTH_SOCK for
// ssh, the system's default (Negotiate/NTLM) for http(s). A URL's own user:password is used by
// libgit2's http transport before it asks. No key files or passwords are read by kilnd.
int Credentials(git_credential** out, const char* /*url*/, const char* username_from_url,
                unsigned int allowed, void* payload) {
  int& attempts = *static_cast<int*>(payload);
  if (attempts++ > 0) {
    git_error_set_str(GIT_ERROR_NET,
                      "authentication failed with the credentials libgit2 found (ssh-agent for "
                      "ssh, the system's default for https)");
    return GIT_EUSER;
  }
  if ((allowed & GIT_CREDENTIAL_SSH_KEY) != 0) {
    return git_credential_ssh_key_from_agent(
        out, username_from_url != nullptr ? username_from_url : "git");
  }
  if ((allowed & GIT_CREDENTIAL_DEFAULT) != 0) return git_credential_default_new(out);
  return GIT_PASSTHROUGH;
}

// The repository that owns `work` (made on first use), with its "origin" remote at `url`.
StatusOr<Repository> OpenOrInit(const fs::path& work, const std::string& url) {
  git_repository* raw = nullptr;
  int rc = git_repository_open_ext(&raw, work.c_str(), GIT_REPOSITORY_OPEN_NO_SEARCH, nullptr);
  if (rc == GIT_ENOTFOUND) {
    std::error_code ec;
    fs::create_directories(work, ec);
    if (ec) return UnavailableError(work.string() + ": " + ec.message());
    rc = git_repository_init(&raw, work.c_str(), /*is_bare=*/0);
  }
  if (rc != 0) return Error("git repository " + work.string(), rc);
  Repository repo(raw);
  git_remote* remote = nullptr;
  rc = git_remote_lookup(&remote, raw, "origin");
  if (rc == GIT_ENOTFOUND) rc = git_remote_create(&remote, raw, "origin", url.c_str());
  if (rc != 0) return Error("git remote origin", rc);
  Remote owned(remote);
  if (url != git_remote_url(remote)) {
    if (rc = git_remote_set_url(raw, "origin", url.c_str()); rc != 0)
      return Error("git remote origin", rc);
  }
  return repo;
}

}  // namespace

bool IsGitSource(std::string_view manifests) { return manifests.starts_with(kPrefix); }

StatusOr<SourceSpec> ParseSource(std::string_view manifests) {
  EnsureInitialised();
  if (!IsGitSource(manifests)) {
    return InvalidArgumentError("--manifests: a git source starts with git+, got \"" +
                                std::string(manifests) + "\"");
  }
  std::string_view rest = manifests.substr(kPrefix.size());
  SourceSpec spec;
  if (const size_t hash = rest.rfind('#'); hash != std::string_view::npos) {
    spec.branch = std::string(rest.substr(hash + 1));
    rest = rest.substr(0, hash);
  }
  spec.url = std::string(rest);
  const size_t scheme_end = spec.url.find("://");
  const std::string scheme = scheme_end == std::string::npos ? "" : spec.url.substr(0, scheme_end);
  if (scheme != "file" && scheme != "https" && scheme != "http" && scheme != "ssh") {
    return InvalidArgumentError(
        "--manifests: git+ takes a file://, https://, http:// or ssh:// URL, got \"" + spec.url +
        "\"");
  }
  if (spec.url.size() == scheme_end + 3) {
    return InvalidArgumentError("--manifests: the git URL has no host or path");
  }
  int valid = 0;
  const std::string ref = "refs/heads/" + spec.branch;
  if (spec.branch.empty() || git_reference_name_is_valid(&valid, ref.c_str()) != 0 || !valid) {
    return InvalidArgumentError("--manifests: \"" + spec.branch + "\" is not a valid branch name");
  }
  return spec;
}

std::string CommitLabel(const SourceCommit& c) {
  return c.id.substr(0, 12) + " \"" + c.subject + "\"";
}

Source::Source(SourceSpec spec, const fs::path& dir, Duration poll, const Clock& clock)
    : spec_(std::move(spec)), work_(dir / "work"), clock_(clock) {
  EnsureInitialised();
  status_.url = spec_.url;
  status_.branch = spec_.branch;
  status_.poll_interval_ms = poll.count();
}

fs::path Source::DirFor(const fs::path& state, const SourceSpec& spec) {
  // Readable (the repository's last path component) and unique (a hash of URL and branch).
  std::string name = spec.url.substr(spec.url.find_last_of("/:") + 1);
  if (name.ends_with(".git")) name.resize(name.size() - 4);
  for (char& ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_') ch = '_';
  }
  if (name.size() > 40) name.resize(40);
  return state / "git" / (name + "-" + Sha256Hex(spec.url + "#" + spec.branch).substr(0, 12));
}

StatusOr<SourceCommit> Source::FetchAndCheckOut() {
  ASSIGN_OR_RETURN(Repository repo, OpenOrInit(work_, spec_.url));
  git_remote* raw_remote = nullptr;
  int rc = git_remote_lookup(&raw_remote, repo.get(), "origin");
  if (rc != 0) return Error("git remote origin", rc);
  Remote remote(raw_remote);

  const std::string tracking = "refs/remotes/origin/" + spec_.branch;
  std::string refspec = "+refs/heads/" + spec_.branch + ":" + tracking;
  char* specs[] = {refspec.data()};
  const git_strarray refspecs = {specs, 1};
  git_fetch_options options;
  git_fetch_options_init(&options, GIT_FETCH_OPTIONS_VERSION);
  int attempts = 0;
  options.callbacks.credentials = Credentials;
  options.callbacks.payload = &attempts;
  options.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_NONE;
  rc = git_remote_fetch(raw_remote, &refspecs, &options, "kilnd: fetch");
  if (rc != 0) return Error("cannot fetch " + spec_.branch + " from " + spec_.url, rc);

  git_oid id;
  rc = git_reference_name_to_id(&id, repo.get(), tracking.c_str());
  if (rc == GIT_ENOTFOUND) {
    return NotFoundError("branch " + spec_.branch + " not found in " + spec_.url);
  }
  if (rc != 0) return Error("git " + tracking, rc);
  git_commit* raw_commit = nullptr;
  if (rc = git_commit_lookup(&raw_commit, repo.get(), &id); rc != 0) return Error("git commit", rc);
  Commit commit(raw_commit);
  SourceCommit seen = Describe(raw_commit);
  if (checked_out_ && checked_out_->id == seen.id) return seen;

  // Forced: the work tree is kilnd's own; anything changed or left there is overwritten, so the
  // files loaded are exactly the commit's.
  git_checkout_options checkout;
  git_checkout_options_init(&checkout, GIT_CHECKOUT_OPTIONS_VERSION);
  checkout.checkout_strategy = GIT_CHECKOUT_FORCE | GIT_CHECKOUT_REMOVE_UNTRACKED;
  rc = git_checkout_tree(repo.get(), reinterpret_cast<const git_object*>(raw_commit), &checkout);
  if (rc != 0)
    return Error("cannot check out " + CommitLabel(seen) + " into " + work_.string(), rc);
  if (rc = git_repository_set_head_detached(repo.get(), &id); rc != 0)
    return Error("git HEAD of " + work_.string(), rc);
  LogInfo("checked out the manifests' branch", {{"url", spec_.url},
                                                {"branch", spec_.branch},
                                                {"commit", seen.id},
                                                {"subject", seen.subject}});
  return seen;
}

std::optional<SourceCommit> Source::Update() {
  {
    std::lock_guard lock(mu_);
    taken_ = requested_;
  }
  StatusOr<SourceCommit> fetched = FetchAndCheckOut();
  if (!fetched.ok() && !checked_out_) {
    // What an earlier kilnd checked out is still there: it is the last good checkout.
    git_repository* raw = nullptr;
    if (git_repository_open_ext(&raw, work_.c_str(), GIT_REPOSITORY_OPEN_NO_SEARCH, nullptr) == 0) {
      Repository repo(raw);
      git_oid id;
      git_commit* raw_commit = nullptr;
      if (git_reference_name_to_id(&id, raw, "HEAD") == 0 &&
          git_commit_lookup(&raw_commit, raw, &id) == 0) {
        Commit commit(raw_commit);
        checked_out_ = Describe(raw_commit);
      }
    }
  }
  if (fetched.ok()) checked_out_ = *fetched;
  const int64_t now = ToUnixMillis(clock_.SystemNow());
  std::lock_guard lock(mu_);
  status_.last_fetch_ms = now;
  if (fetched.ok()) {
    if (!status_.fetch_error.empty()) {
      LogInfo("fetching the manifests' branch works again",
              {{"url", spec_.url}, {"branch", spec_.branch}});
    }
    status_.seen = *fetched;
    status_.fetch_error.clear();
    status_.last_success_ms = now;
  } else {
    if (status_.fetch_error != fetched.status().message()) {
      LogError(
          "cannot fetch the manifests' branch; keeping the last good state",
          {{"url", spec_.url}, {"branch", spec_.branch}, {"error", fetched.status().message()}});
    }
    status_.fetch_error = fetched.status().message();
    if (!status_.seen && checked_out_) status_.seen = checked_out_;
  }
  return checked_out_;
}

void Source::RecordLoad(const std::optional<SourceCommit>& commit, const std::string& first_error) {
  std::lock_guard lock(mu_);
  if (commit) {
    status_.manifest_error = first_error;
    if (first_error.empty()) status_.deployed = *commit;
  }
  loaded_.push_back(taken_);
}

void Source::RecordApplied() {
  std::lock_guard lock(mu_);
  if (loaded_.empty()) return;
  status_.fetches_done = std::max(status_.fetches_done, loaded_.front());
  loaded_.pop_front();
}

int64_t Source::RequestFetch() {
  std::lock_guard lock(mu_);
  return ++requested_;
}

SourceStatus Source::Status() const {
  std::lock_guard lock(mu_);
  return status_;
}

}  // namespace kiln::git
