// GPT-2's byte-level BPE for bulk text: the pre-tokenizer's pattern written out by hand, each
// distinct piece byte-pair-encoded once and remembered.
//
// The pattern is GPT-2's ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+),
// matched alternative by alternative as a backtracking regex engine does. Which characters are
// letters, numbers and spaces comes from a table built in Python (gpt2_native.char_classes);
// a text holding a character the table cannot place is not encoded here (encode returns None)
// and the caller encodes it another way.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace nb = nanobind;

namespace {

enum Class : uint8_t { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3, UNKNOWN = 4 };
constexpr size_t CODE_POINTS = 0x110000;
constexpr size_t LONGEST_REMEMBERED = 256;  // bytes; longer pieces seldom repeat
constexpr uint32_t GONE = UINT32_MAX;

using Ids = nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>;

// a piece is looked up by its string_view, without copying it into a string
struct ViewHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

struct Merge {
  uint32_t rank, id;
};

class Encoder {
 public:
  // classes: one Class per code point; byte_ids: each byte's token; merges: (left, right, made)
  // token triples, best first; remember: distinct pieces kept before starting over.
  Encoder(nb::bytes classes, std::vector<uint32_t> byte_ids,
          const std::vector<std::tuple<uint32_t, uint32_t, uint32_t>>& merges, size_t remember)
      : classes_(static_cast<const uint8_t*>(classes.data()),
                 static_cast<const uint8_t*>(classes.data()) + classes.size()),
        remember_(remember) {
    if (classes_.size() != CODE_POINTS || byte_ids.size() != 256)
      throw std::invalid_argument("a class for each code point and a token for each byte are needed");
    std::copy(byte_ids.begin(), byte_ids.end(), byte_ids_);
    pairs_.reserve(merges.size());
    for (size_t r = 0; r < merges.size(); ++r) {
      auto [a, b, made] = merges[r];
      pairs_.emplace(key(a, b), Merge{static_cast<uint32_t>(r), made});
    }
  }

  // The ids of a text, or None when it holds a character of unknown class, is not UTF-8 (a lone
  // surrogate) or is 2 GB or longer.
  std::optional<Ids> encode(nb::handle text) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
    if (data == nullptr) {
      PyErr_Clear();
      return std::nullopt;
    }
    s_ = reinterpret_cast<const uint8_t*>(data);
    n_ = static_cast<size_t>(size);
    if (n_ > INT32_MAX || !all_known()) return std::nullopt;  // bpe() indexes a piece with int32
    auto* out = new std::vector<uint32_t>();
    out->reserve(n_ / 3 + 16);
    for (size_t i = 0; i < n_;) {
      size_t end = piece_end(i);
      emit(i, end, *out);
      i = end;
    }
    nb::capsule owner(out, [](void* p) noexcept { delete static_cast<std::vector<uint32_t>*>(p); });
    return Ids(out->data(), {out->size()}, owner);
  }

  size_t remembered() const { return known_.size(); }

 private:
  static uint64_t key(uint32_t a, uint32_t b) { return (static_cast<uint64_t>(a) << 32) | b; }

  // The class of the character at byte i, and its length in bytes.
  uint8_t at(size_t i, size_t& len) const {
    uint8_t c = s_[i];
    uint32_t cp;
    if (c < 0x80) {
      len = 1;
      cp = c;
    } else if (c < 0xE0) {
      len = 2;
      cp = ((c & 0x1Fu) << 6) | (s_[i + 1] & 0x3Fu);
    } else if (c < 0xF0) {
      len = 3;
      cp = ((c & 0x0Fu) << 12) | ((s_[i + 1] & 0x3Fu) << 6) | (s_[i + 2] & 0x3Fu);
    } else {
      len = 4;
      cp = ((c & 0x07u) << 18) | ((s_[i + 1] & 0x3Fu) << 12) | ((s_[i + 2] & 0x3Fu) << 6) | (s_[i + 3] & 0x3Fu);
    }
    return classes_[cp];
  }

  bool all_known() const {
    for (size_t i = 0, len; i < n_; i += len) {
      if (s_[i] < 0x80) {
        len = 1;
        continue;
      }
      if (at(i, len) == UNKNOWN) return false;
    }
    return true;
  }

  // Where the piece that starts at byte i ends: the first alternative of the pattern that matches.
  size_t piece_end(size_t i) const {
    uint8_t c = s_[i];
    if (c == '\'' && i + 1 < n_) {  // 's 't 'm 'd 're 've 'll
      uint8_t a = s_[i + 1];
      if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
      if (i + 2 < n_) {
        uint8_t b = s_[i + 2];
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
      }
    }
    size_t j = (c == ' ' && i + 1 < n_) ? i + 1 : i, len;
    uint8_t k = at(j, len);
    if (k != SPACE) {  // a run of letters, of numbers or of other characters, after at most one space
      size_t end = j + len;
      while (end < n_) {
        uint8_t next = at(end, len);
        if (next != k && (k != OTHER || next == LETTER || next == NUMBER || next == SPACE)) break;
        end += len;
      }
      return end;
    }
    size_t end = i, last = i;  // \s+(?!\S), else \s+
    while (end < n_ && at(end, len) == SPACE) {
      last = end;
      end += len;
    }
    if (end == n_) return end;
    return last > i ? last : end;  // the last space goes with what follows it
  }

  void emit(size_t begin, size_t end, std::vector<uint32_t>& out) {
    if (end - begin == 1) {
      out.push_back(byte_ids_[s_[begin]]);
      return;
    }
    std::string_view piece(reinterpret_cast<const char*>(s_ + begin), end - begin);
    if (piece.size() > LONGEST_REMEMBERED) {
      bpe(piece, out);
      return;
    }
    auto found = known_.find(piece);
    if (found == known_.end()) {
      if (known_.size() >= remember_) {  // start over: memory stays bounded
        known_.clear();
        arena_.clear();
      }
      size_t from = arena_.size();
      bpe(piece, arena_);
      found = known_.emplace(std::string(piece), std::make_pair(from, arena_.size() - from)).first;
    }
    auto [from, count] = found->second;
    out.insert(out.end(), arena_.begin() + from, arena_.begin() + from + count);
  }

  // Byte-pair-encode a piece: the best-ranked adjacent pair merged first, the leftmost of equals.
  void bpe(std::string_view piece, std::vector<uint32_t>& out) const {
    size_t m = piece.size();
    std::vector<uint32_t> id(m);
    std::vector<int32_t> prev(m), next(m);
    for (size_t i = 0; i < m; ++i) {
      id[i] = byte_ids_[static_cast<uint8_t>(piece[i])];
      prev[i] = static_cast<int32_t>(i) - 1;
      next[i] = i + 1 < m ? static_cast<int32_t>(i) + 1 : -1;
    }
    // (rank << 32 | position of the pair's left token): the best rank first, the leftmost of equals
    std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>> heap;
    auto offer = [&](int32_t left) {
      auto it = pairs_.find(key(id[left], id[next[left]]));
      if (it != pairs_.end()) heap.push(key(it->second.rank, static_cast<uint32_t>(left)));
    };
    for (size_t i = 0; i + 1 < m; ++i) offer(static_cast<int32_t>(i));
    while (!heap.empty()) {
      uint32_t rank = static_cast<uint32_t>(heap.top() >> 32);
      int32_t left = static_cast<int32_t>(heap.top() & 0xFFFFFFFFu);
      heap.pop();
      int32_t right = next[left];
      if (id[left] == GONE || right < 0) continue;
      auto it = pairs_.find(key(id[left], id[right]));
      if (it == pairs_.end() || it->second.rank != rank) continue;  // that pair was merged away
      id[left] = it->second.id;
      id[right] = GONE;
      next[left] = next[right];
      if (next[right] >= 0) prev[next[right]] = left;
      if (prev[left] >= 0) offer(prev[left]);
      if (next[left] >= 0) offer(left);
    }
    for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
  }

  std::vector<uint8_t> classes_;
  uint32_t byte_ids_[256];
  std::unordered_map<uint64_t, Merge> pairs_;
  size_t remember_;
  std::unordered_map<std::string, std::pair<size_t, size_t>, ViewHash, std::equal_to<>> known_;
  std::vector<uint32_t> arena_;
  const uint8_t* s_ = nullptr;
  size_t n_ = 0;
};

}  // namespace

NB_MODULE(_mlx_gpt_bpe, m) {
  nb::class_<Encoder>(m, "Encoder")
      .def(nb::init<nb::bytes, std::vector<uint32_t>, const std::vector<std::tuple<uint32_t, uint32_t, uint32_t>>&,
                    size_t>(),
           nb::arg("classes"), nb::arg("byte_ids"), nb::arg("merges"), nb::arg("remember"))
      .def("encode", &Encoder::encode, nb::arg("text"))
      .def_prop_ro("remembered", &Encoder::remembered);
}
