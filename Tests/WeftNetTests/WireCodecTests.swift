#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
@testable import WeftProto
@testable import WeftNet

final class WireCodecTests: XCTestCase {
    func testSamplesCoverEveryOpcode() {
        XCTAssertEqual(Set(WireSamples.requests.map(\.opcode)), Set(HubOpcode.allCases))
        // recall has two samples: a recall with names and a notice.
        XCTAssertEqual(WireSamples.requests.count, HubOpcode.allCases.count + 1)
    }

    func testFrameLayout() throws {
        let frame = WireCodec.encodeRequest(id: 0x0102_0304_0506_0708, .getattr(WireSamples.context, ino: 5))
        XCTAssertEqual(Array(frame[0..<4]), withUnsafeBytes(of: UInt32(frame.count - 4).littleEndian, Array.init))
        XCTAssertEqual(frame[4], 2, "version")
        XCTAssertEqual(frame[5], 0, "kind request")
        XCTAssertEqual(Array(frame[6..<8]), [UInt8(HubOpcode.getattr.rawValue), 0], "opcode LE")
        XCTAssertEqual(Array(frame[8..<16]), [8, 7, 6, 5, 4, 3, 2, 1], "request id LE")
        // Payload: the context first (session u64 LE).
        XCTAssertEqual(Array(frame[16..<24]), withUnsafeBytes(of: WireSamples.context.session.littleEndian, Array.init))

        let response = WireCodec.encodeResponse(id: 9, opcode: .unlink, .failure(WeftError(ENOENT, "gone")))
        XCTAssertEqual(response[5], 1, "kind response")
        XCTAssertEqual(Array(response[16..<20]), [UInt8(ENOENT), 0, 0, 0], "status i32 LE")
        XCTAssertEqual(Array(response[20...]), [4, 0, 0, 0] + Array("gone".utf8), "message")
    }

    func testEveryRequestRoundTrips() throws {
        for (index, request) in (WireSamples.requests + WireSamples.edgeRequests).enumerated() {
            let id = UInt64(index) &* 0x1_0000_0001 &+ 3
            let frame = try WireCodec.decodeFrame(WireCodec.encodeRequest(id: id, request))
            XCTAssertEqual(frame.kind, .request)
            XCTAssertEqual(frame.opcode, request.opcode)
            XCTAssertEqual(frame.requestID, id)
            XCTAssertEqual(try WireCodec.decodeRequest(frame), request, "\(request.opcode)")
        }
    }

    func testEveryResponseRoundTrips() throws {
        var cases = WireSamples.valueOpcodes.map { ($0, WireSamples.response(for: $0)) }
        cases += WireSamples.edgeResponses
        for (opcode, response) in cases {
            let frame = try WireCodec.decodeFrame(WireCodec.encodeResponse(id: 77, opcode: opcode, .success(response)))
            XCTAssertEqual(frame.kind, .response)
            XCTAssertEqual(frame.requestID, 77)
            XCTAssertEqual(try WireCodec.decodeResponse(frame).get(), response, "\(opcode)")
        }
    }

    /// Opcode 55's reply is opcode 30's with the remaining problems after it; a report that
    /// does not say (nil) goes as every problem remaining.
    func testFsckResultIsTheReportThenTheRemainingProblems() throws {
        let report = FsckReport(inodesChecked: 5, chunksChecked: 6, problems: ["a", "b"], repaired: ["c"], remaining: ["b"])
        let old = WireCodec.encodeResponse(id: 1, opcode: .fsck, .success(.fsckReport(report)))
        let new = WireCodec.encodeResponse(id: 1, opcode: .fsckRemaining, .success(.fsckResult(report)))
        var tail = ByteWriter()
        tail.u8(1); tail.u32(1); tail.string("b")
        XCTAssertEqual(Array(new[8...]), Array(old[8...]) + tail.bytes, "after the length, version, kind and opcode")
        // Every problem remaining: one byte, no second copy of the list.
        var all = report
        all.remaining = report.problems
        let short = WireCodec.encodeResponse(id: 1, opcode: .fsckRemaining, .success(.fsckResult(all)))
        XCTAssertEqual(Array(short[8...]), Array(old[8...]) + [0])
        var unknownForm = short
        unknownForm[unknownForm.count - 1] = 2
        XCTAssertErrno(EBADMSG, try WireCodec.decodeResponse(try WireCodec.decodeFrame(unknownForm)).get())
        var withoutRemaining = report
        withoutRemaining.remaining = nil
        XCTAssertEqual(try WireCodec.decodeResponse(try WireCodec.decodeFrame(old)).get(), .fsckReport(withoutRemaining),
                       "opcode 30 carries no remaining list")
        let unsaid = WireCodec.encodeResponse(id: 1, opcode: .fsckRemaining, .success(.fsckResult(withoutRemaining)))
        XCTAssertEqual(try WireCodec.decodeResponse(try WireCodec.decodeFrame(unsaid)).get(),
                       .fsckResult(FsckReport(inodesChecked: 5, chunksChecked: 6, problems: ["a", "b"], repaired: ["c"],
                                              remaining: ["a", "b"])))
    }

    /// A cluster hub's report of several volumes gives each an equal share of the reply: one
    /// volume with more lines than fit does not crowd out the lines of the others, and the
    /// counts still stand for every line.
    func testAMergedFsckReportKeepsEveryVolumesShareAndCounts() throws {
        let noisy = FsckReport(inodesChecked: 10, chunksChecked: 20,
                               problems: (0..<150).map { "chunk \($0) is not referenced by any file (orphan)" },
                               repaired: [], remaining: nil)
        let quiet = FsckReport(inodesChecked: 1, chunksChecked: 2, problems: ["chunk 7 is damaged", "inode 9 is lost"],
                               repaired: ["reclaimed inode 3"], remaining: ["inode 9 is lost"])
        let merged = FsckReport.merged([(id: "1", report: noisy), (id: "2", report: quiet)], linesMax: 100)
        XCTAssertEqual(merged.inodesChecked, 11)
        XCTAssertEqual(merged.chunksChecked, 22)
        XCTAssertTrue(merged.problems.contains("volume 2: chunk 7 is damaged"))
        XCTAssertTrue(merged.problems.contains("volume 2: inode 9 is lost"))
        XCTAssertEqual(merged.problems.filter { $0.hasPrefix("volume 1: ") }.count, 50, "49 lines and a marker")
        XCTAssertEqual(merged.problems.last(where: { $0.hasPrefix("volume 1: ") }),
                       "volume 1: ... and 101 more not listed (this reply lists 49)")
        XCTAssertEqual(FsckReport.lineCount(merged.problems), 152)
        XCTAssertEqual(merged.repaired, ["volume 2: reclaimed inode 3"])
        XCTAssertEqual(FsckReport.lineCount(merged.unresolved), 151, "volume 1 says nothing: all 150 remain")
        XCTAssertTrue(merged.unresolved.contains("volume 2: inode 9 is lost"))
        XCTAssertEqual(merged.limited(linesMax: 100, bytesMax: FsckReport.wireListBytesMax), merged,
                       "nothing left for the reply's own cut")
        XCTAssertNil(FsckReport.cutCount("chunk 1: ... and 3 more not listed"), "only a marker line, or one of a volume")
        XCTAssertNil(FsckReport.cutCount("volume 1: entry 'x: ... and 99999999 more not listed' in directory 5"),
                     "a problem that quotes a name with the marker's words")
        XCTAssertNil(FsckReport.cutCount("volume : ... and 3 more not listed"))
        XCTAssertEqual(FsckReport.cutCount("volume 65535: ... and 3 more not listed (this reply lists 9)"), 3)
    }

    /// A report of more problems than a reply may list is cut, with a line saying how many
    /// more there were, and still decodes (the decoder takes at most 1,000,000 a list).
    func testAnFsckReportTooLongForAReplyIsCutWithACount() throws {
        let problems = (0..<(FsckReport.wireLinesMax + 5)).map { "chunk \($0) is not referenced by any file (orphan)" }
        let report = FsckReport(inodesChecked: 1, chunksChecked: 2, problems: problems, repaired: ["r"], remaining: problems)
        let cut = report.limitedForWire()
        XCTAssertEqual(cut.problems.count, FsckReport.wireLinesMax + 1)
        XCTAssertEqual(cut.problems.last, "... and 5 more not listed (this reply lists \(FsckReport.wireLinesMax))")
        XCTAssertEqual(FsckReport.lineCount(cut.problems), problems.count, "the count stands for every problem")
        XCTAssertEqual(FsckReport.lineCount(["a", "b"]), 2)
        XCTAssertEqual(Array(cut.problems.prefix(3)), Array(problems.prefix(3)))
        XCTAssertEqual(cut.remaining, cut.problems)
        XCTAssertEqual(cut.repaired, ["r"])
        let frame = WireCodec.encodeResponse(id: 1, opcode: .fsckRemaining, .success(.fsckResult(cut)))
        XCTAssertEqual(try WireCodec.decodeResponse(try WireCodec.decodeFrame(frame)).get(), .fsckResult(cut))
        // Long lines: cut by bytes first.
        let long = FsckReport(problems: Array(repeating: String(repeating: "x", count: 4000), count: 10_000))
        let cutLong = long.limitedForWire()
        XCTAssertLessThan(cutLong.problems.count, 10_000)
        XCTAssertTrue(cutLong.problems.last?.hasPrefix("... and ") == true)
        XCTAssertLessThanOrEqual(cutLong.problems.dropLast().reduce(0) { $0 + 4 + $1.utf8.count }, FsckReport.wireListBytesMax)
        XCTAssertEqual(FsckReport(problems: ["a"]).limitedForWire(), FsckReport(problems: ["a"]), "short reports are unchanged")
    }

    func testEveryErrorResponseRoundTripsWithErrnoAndMessage() throws {
        for (index, opcode) in HubOpcode.allCases.enumerated() {
            let errno = [ENOENT, EEXIST, ENOTEMPTY, EXDEV, EACCES, ENOSPC, EIO, ETIMEDOUT, ENAMETOOLONG][index % 9]
            let message = "failure \(index) ✗"
            let frame = try WireCodec.decodeFrame(
                WireCodec.encodeResponse(id: UInt64(index), opcode: opcode, .failure(WeftError(errno, message))))
            guard case .failure(let error) = try WireCodec.decodeResponse(frame) else {
                return XCTFail("\(opcode): expected a failure")
            }
            XCTAssertEqual(error.errno, errno)
            XCTAssertEqual(error.message, message)
        }
        // errno 0 must not read as success; long messages are cut to the wire limit.
        let frame = try WireCodec.decodeFrame(WireCodec.encodeResponse(
            id: 1, opcode: .sync, .failure(WeftError(0, String(repeating: "m", count: 10_000)))))
        guard case .failure(let error) = try WireCodec.decodeResponse(frame) else { return XCTFail("expected a failure") }
        XCTAssertEqual(error.errno, EIO)
        XCTAssertEqual(error.message.utf8.count, WireCodec.stringMaxBytes)
    }

    func testEveryTruncatedFrameIsRejected() throws {
        for request in WireSamples.requests where request.opcode != .writeSlice && request.opcode != .setxattr {
            let frame = WireCodec.encodeRequest(id: 1, request)
            for length in 0..<frame.count {
                XCTAssertThrowsError(try WireCodec.decodeFrame(Array(frame.prefix(length))), "\(request.opcode) prefix \(length)") {
                    XCTAssertEqual(($0 as? WeftError)?.errno, EPROTO)
                }
            }
        }
        // Large frames: a sample of prefix lengths, including every one near the header.
        for request in WireSamples.requests where request.opcode == .writeSlice || request.opcode == .setxattr {
            let frame = WireCodec.encodeRequest(id: 1, request)
            for length in Array(0..<64) + stride(from: 64, to: frame.count, by: 997) + [frame.count - 1] {
                XCTAssertThrowsError(try WireCodec.decodeFrame(Array(frame.prefix(length))), "\(request.opcode) prefix \(length)")
            }
        }
    }

    func testEveryTruncatedPayloadIsRejected() throws {
        // The length prefix agrees with the bytes, but the payload stops short.
        for request in WireSamples.requests where request.opcode != .writeSlice && request.opcode != .setxattr {
            let full = WireCodec.encodeRequest(id: 1, request)
            for payloadBytes in 0..<(full.count - 16) {
                let frame = withLength(Array(full.prefix(16 + payloadBytes)))
                XCTAssertThrowsError(try WireCodec.decodeRequest(WireCodec.decodeFrame(frame)),
                                     "\(request.opcode) payload \(payloadBytes)") {
                    XCTAssertEqual(($0 as? WeftError)?.errno, EBADMSG)
                }
            }
        }
        for opcode in WireSamples.valueOpcodes where opcode != .readSlice {
            let full = WireCodec.encodeResponse(id: 1, opcode: opcode, .success(WireSamples.response(for: opcode)))
            for payloadBytes in 0..<(full.count - 16) {
                let frame = withLength(Array(full.prefix(16 + payloadBytes)))
                XCTAssertThrowsError(try WireCodec.decodeResponse(WireCodec.decodeFrame(frame)), "\(opcode) payload \(payloadBytes)")
            }
        }
    }

    func testTrailingBytesAreRejected() throws {
        for request in WireSamples.requests {
            let frame = withLength(WireCodec.encodeRequest(id: 1, request) + [0])
            XCTAssertThrowsError(try WireCodec.decodeRequest(WireCodec.decodeFrame(frame)), "\(request.opcode)") {
                XCTAssertEqual(($0 as? WeftError)?.errno, EBADMSG)
            }
        }
        for opcode in WireSamples.valueOpcodes {
            let frame = withLength(WireCodec.encodeResponse(id: 1, opcode: opcode, .success(WireSamples.response(for: opcode))) + [1, 2])
            XCTAssertThrowsError(try WireCodec.decodeResponse(WireCodec.decodeFrame(frame)), "\(opcode)")
        }
        // Bytes beyond the announced length.
        XCTAssertThrowsError(try WireCodec.decodeFrame(WireCodec.encodeRequest(id: 1, .status) + [0]))
    }

    func testOversizedLengthIsRejectedBeforeReadingFurther() {
        for length in [UInt32(WireCodec.maxFrameBytes + 1), UInt32.max, UInt32(Limits.transferMaxBytes * 2)] {
            var frame = withUnsafeBytes(of: length.littleEndian, Array.init)
            frame += [1, 0, 1, 0] + Array(repeating: 0, count: 8)
            XCTAssertThrowsError(try WireCodec.decodeFrame(frame)) {
                XCTAssertEqual(($0 as? WeftError)?.errno, EPROTO)
                XCTAssertTrue(($0 as? WeftError)?.message.contains("exceeds") ?? false, "\($0)")
            }
        }
        // Shorter than the header.
        XCTAssertThrowsError(try WireCodec.decodeFrame([11, 0, 0, 0] + Array(repeating: 0, count: 11)))
    }

    func testWrongVersionKindAndOpcodeAreRejected() throws {
        let good = WireCodec.encodeRequest(id: 5, .statfs(WireSamples.context))
        for version: UInt8 in [0, 1, 3, 255] {
            var frame = good
            frame[4] = version
            XCTAssertThrowsError(try WireCodec.decodeFrame(frame)) {
                XCTAssertEqual(($0 as? WeftError)?.errno, EPROTO)
                XCTAssertTrue(($0 as? WeftError)?.message.contains("version") ?? false)
            }
        }
        for kind: UInt8 in [3, 4, 255] {
            var frame = good
            frame[5] = kind
            XCTAssertThrowsError(try WireCodec.decodeFrame(frame)) { XCTAssertEqual(($0 as? WeftError)?.errno, EPROTO) }
        }
        for opcode: UInt16 in [0, HubOpcode.allCases.map(\.rawValue).max()! + 1, 0x7FFF, 0xFFFF] {
            var frame = good
            frame[6] = UInt8(opcode & 0xFF)
            frame[7] = UInt8(opcode >> 8)
            XCTAssertThrowsError(try WireCodec.decodeFrame(frame)) {
                XCTAssertEqual(($0 as? WeftError)?.errno, EPROTO)
                XCTAssertTrue(($0 as? WeftError)?.message.contains("opcode") ?? false)
            }
        }
        // A response is not a request and vice versa.
        XCTAssertThrowsError(try WireCodec.decodeResponse(WireCodec.decodeFrame(good)))
        let response = WireCodec.encodeResponse(id: 5, opcode: .sync, .success(.empty))
        XCTAssertThrowsError(try WireCodec.decodeRequest(WireCodec.decodeFrame(response)))
        // A negative status.
        var negative = response
        negative[16..<20] = [0xFF, 0xFF, 0xFF, 0xFF]
        XCTAssertThrowsError(try WireCodec.decodeResponse(WireCodec.decodeFrame(negative)))
    }

    func testHugeCountsAreRejectedWithoutAllocating() throws {
        // A readdir response announcing 2^32-1 entries in a few bytes.
        var frame = WireCodec.encodeResponse(id: 1, opcode: .readdir, .success(.entries([])))
        frame.replaceSubrange(20..<24, with: [0xFF, 0xFF, 0xFF, 0xFF])
        XCTAssertThrowsError(try WireCodec.decodeResponse(WireCodec.decodeFrame(frame)))
        // A blob announcing more bytes than the frame has.
        var lookup = WireCodec.encodeRequest(id: 1, .lookup(WireSamples.context, parent: 1, name: [1, 2, 3]))
        let nameLengthOffset = lookup.count - 7
        lookup.replaceSubrange(nameLengthOffset..<nameLengthOffset + 4, with: [0xFF, 0xFF, 0xFF, 0x7F])
        XCTAssertThrowsError(try WireCodec.decodeRequest(WireCodec.decodeFrame(lookup)))
    }

    /// Random bytes and random mutations of valid frames: every outcome is a decoded value or a
    /// `WeftError` with EPROTO/EBADMSG, never a trap. Set WEFT_TEST_SEED to replay.
    func testGarbageNeverCrashes() {
        let seeds: [UInt64]
        if let text = ProcessInfo.processInfo.environment["WEFT_TEST_SEED"], let seed = UInt64(text) {
            seeds = [seed]
        } else {
            seeds = (0..<8).map { _ in UInt64.random(in: 0...UInt64.max) }
        }
        let valid = WireSamples.requests.filter { $0.opcode != .writeSlice }.map { WireCodec.encodeRequest(id: 1, $0) }
            + WireSamples.valueOpcodes.filter { $0 != .readSlice }.map {
                WireCodec.encodeResponse(id: 2, opcode: $0, .success(WireSamples.response(for: $0)))
            }
        for seed in seeds {
            // Printed first so that even a trap leaves the seed in the log.
            print("testGarbageNeverCrashes seed \(seed) (replay with WEFT_TEST_SEED=\(seed))")
            var random = SeededGenerator(seed: seed)
            for iteration in 0..<1500 {
                var bytes: [UInt8]
                switch iteration % 3 {
                case 0:
                    let count = Int.random(in: 0..<300, using: &random)
                    bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &random) }
                case 1:
                    // A plausible header with a random payload.
                    let payloadCount = Int.random(in: 0..<200, using: &random)
                    let kind = UInt8.random(in: 0...1, using: &random)
                    let opcode = UInt16.random(in: 1...UInt16(HubOpcode.allCases.count), using: &random)
                    bytes = [0, 0, 0, 0, 1, kind, UInt8(opcode), 0] + Array(repeating: 0, count: 8)
                        + (0..<payloadCount).map { _ in UInt8.random(in: 0...255, using: &random) }
                    bytes = withLength(bytes)
                default:
                    bytes = valid.randomElement(using: &random)!
                    for _ in 0..<Int.random(in: 1...4, using: &random) {
                        let position = Int.random(in: 4..<bytes.count, using: &random)
                        bytes[position] = UInt8.random(in: 0...255, using: &random)
                    }
                    if Bool.random(using: &random) {
                        bytes.removeLast(Int.random(in: 0...min(8, bytes.count - 16), using: &random))
                        bytes = withLength(bytes)
                    }
                }
                do {
                    let frame = try WireCodec.decodeFrame(bytes)
                    switch frame.kind {
                    case .request, .callback: _ = try WireCodec.decodeRequest(frame)
                    case .response: _ = try WireCodec.decodeResponse(frame)
                    }
                } catch let error as WeftError {
                    XCTAssert([EPROTO, EBADMSG].contains(error.errno), "seed \(seed) iteration \(iteration): \(error)")
                } catch {
                    XCTFail("seed \(seed) iteration \(iteration): not a WeftError: \(error)")
                }
            }
        }
    }

    func testFrameOfMaximumSizeIsAccepted() throws {
        let data = [UInt8](repeating: 0xA5, count: Limits.transferMaxBytes)
        let bytes = WireCodec.encodeResponse(id: 3, opcode: .readSlice, .success(.bytes(data)))
        XCTAssertLessThanOrEqual(bytes.count - 4, WireCodec.maxFrameBytes)
        XCTAssertEqual(try WireCodec.decodeResponse(WireCodec.decodeFrame(bytes)).get(), .bytes(data))
    }

    func testSessionSubstitutionTouchesOnlyTheSession() {
        for request in WireSamples.requests {
            let moved = request.withSession(5)
            XCTAssertEqual(moved.opcode, request.opcode)
            if request.session == nil {
                XCTAssertEqual(moved, request)
            } else {
                XCTAssertEqual(moved.session, 5, "\(request.opcode)")
                XCTAssertEqual(moved.withSession(request.session!), request, "\(request.opcode)")
            }
        }
    }

    /// Rewrites the length prefix to match the bytes.
    private func withLength(_ frame: [UInt8]) -> [UInt8] {
        var frame = frame
        let length = withUnsafeBytes(of: UInt32(frame.count - 4).littleEndian, Array.init)
        frame.replaceSubrange(0..<4, with: length)
        return frame
    }
}
